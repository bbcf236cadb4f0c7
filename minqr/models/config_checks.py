"""Checks of a config.json's fields that both backbones' configs make (gpt2.py, llama.py). A
config.json is read as untrusted: a string where a number belongs would be a TypeError deep in a
layer, a zero or negative epsilon a model of NaN, a bool token id a silent wrong id."""
from minqr.reading import is_finite_number


def number_problems(config, names, positive: bool = False, below_one: bool = False) -> list[str]:
    """What is wrong with the config's fields `names` as finite numbers (> 0 with `positive`, in
    [0, 1) with `below_one`)."""
    problems = []
    for name in names:
        value = getattr(config, name)
        if not is_finite_number(value) or (positive and value <= 0) or (below_one and not 0 <= value < 1):
            want = "a number > 0" if positive else "a number in [0, 1)" if below_one else "a finite number"
            problems.append(f"{name}={value!r:.60} must be {want}")
    return problems


def token_id_problems(config, names) -> list[str]:
    """What is wrong with the config's token id fields `names`: each None, an id (an int >= 0, not
    a bool) or a list of ids."""
    def is_id(value):
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 31
    problems = []
    for name in names:
        value = getattr(config, name)
        if value is not None and not is_id(value) and not (isinstance(value, list) and all(map(is_id, value))):
            problems.append(f"{name}={value!r} must be a token id, a list of them, or null")
    return problems
