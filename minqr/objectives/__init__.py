"""What a head's N outputs mean and how they are trained. references.py has each objective's
formula in plain PyTorch (bradley_terry, mixture, independent, paper), the reading to learn from;
loss.py lists the objectives with their hyper-parameters, read-out and training defaults, and
`pair_loss` computes any of them; ops.py binds the fused C++/CUDA ops (csrc/) to torch.library:
fake kernels for torch.compile and the argument checks that mirror the C++ ones; pair_models.py
says, without torch, what each objective's outputs are in a pair and so its likelihood.
"""
