"""Tokenizers beyond GPT-2 and chat templates: minqr's rendering and token ids against transformers'
`apply_chat_template` and tokenizer, on tiny tokenizer folders that carry the templates of Llama 3,
Qwen2 (ChatML), Mistral-instruct and Zephyr; the response starts and shared prefixes of rendered
pairs; what a refusing template, a missing EOS and HH-style strings give."""
import json
import time
from types import SimpleNamespace

import pytest
import transformers
from factories import SENTENCES
from test_pairs import write_records
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from minqr import MinqrError, load_tokenizer
from minqr.data.batching import tokenize_pairs
from minqr.models import template_limits
from minqr.data.chat import prompt_reply_texts, rendering_note, reply_text
from minqr.data.pairs import read_pairs_file
from minqr.training.inputs import load_pairs

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
           "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
           "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are "
           "supported!') }}{% endif %}{% endfor %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] "
          "+ eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + "
          "eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")

ADDED = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
         "special": True}
# style: (template, tokenizer_config.json's special tokens, SentencePiece-like (Metaspace) or byte-level BPE)
STYLES = {
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", **ADDED}},
               False),
    "chatml": (CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, False),
    "mistral": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, True),
    "zephyr": (ZEPHYR, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, True),
}
SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
           "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<unk>", "<|user|>", "<|system|>", "<|assistant|>"]


def message(role, content):
    return {"role": role, "content": content}


SYSTEM = message("system", "You answer in one word.")
TURNS = [message("user", "What colour is the sky?"), message("assistant", "Blue."),
         message("user", "And grass, naïve café?"), message("assistant", "Green 🙂")]
CONVERSATIONS = {"one turn": TURNS[:2], "multi-turn": TURNS, "system": [SYSTEM, *TURNS[:2]],
                 "prompt only": TURNS[:3]}


def write_chat_tokenizer(folder, style):
    """A tiny tokenizer folder: tokenizer.json (trained here) and a tokenizer_config.json with the
    style's chat template and special tokens, as transformers' PreTrainedTokenizerFast loads it."""
    template, tokens, sentencepiece = STYLES[style]
    texts = SENTENCES + [m["content"] for m in TURNS + [SYSTEM]] + [
        "You are a helpful assistant. [INST] [/INST] Red, as grass is. Blue 1. Blue 3."]
    backend = Tokenizer(models.BPE())
    if sentencepiece:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(texts)) | {"▁"})
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet,
                                                           show_progress=False))
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(params=STYLES)
def style(request):
    return request.param


@pytest.fixture
def folders(tmp_path, style):
    """(minqr's tokenizer, transformers' tokenizer) of the same folder."""
    folder = write_chat_tokenizer(tmp_path / style, style)
    return load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


def refuses(style, conversation):
    # Mistral-instruct has no system turn and wants user/assistant to alternate
    return style == "mistral" and conversation[0]["role"] == "system"


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_equals_transformers(folders, style, name, add_generation_prompt):
    ours, hf = folders
    conversation = CONVERSATIONS[name]
    if refuses(style, conversation):
        with pytest.raises(Exception, match="roles must alternate"):
            ours.chat_template.render(conversation)
        return
    text = ours.chat_template.render(conversation, add_generation_prompt)
    assert text == hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]


LAYOUTS = {
    "explicit": [{"prompt": TURNS[:k], "chosen": [message("assistant", f"Blue {k}.")],
                  "rejected": [message("assistant", "Red, as grass is.")]} for k in (1, 3)],
    "implicit": [{"chosen": TURNS[:k] + [message("assistant", f"Blue {k}.")],
                  "rejected": TURNS[:k] + [message("assistant", "Red, as grass is.")]} for k in (1, 3)],
    "system": [{"prompt": [SYSTEM, TURNS[0]], "chosen": [TURNS[1]], "rejected": [message("assistant", "Red.")]}],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pairs_tokenise_as_transformers_renders_them(tmp_path, folders, style, layout):
    """A conversational pair's token ids are transformers' tokens of its rendered conversations;
    the response starts where the conversation leaves its prompt (+ the assistant's header), and the
    shared token prefix covers the rendered prompt."""
    ours, hf = folders
    records = LAYOUTS[layout]
    if refuses(style, records[0].get("prompt") or records[0]["chosen"]):
        return
    pairs, _ = read_pairs_file(write_records(tmp_path / "pairs.jsonl", records))
    tokenized = tokenize_pairs(pairs, ours, max_length=1000)
    for i, record in enumerate(records):
        prompt = record.get("prompt") or record["chosen"][:-1]
        prompt_text = hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        for side, ids, start in (("chosen", tokenized.chosen[i], tokenized.chosen_response[i]),
                                 ("rejected", tokenized.rejected[i], tokenized.rejected_response[i])):
            conversation = record.get("prompt", []) + record[side]
            text = hf.apply_chat_template(conversation, tokenize=False)
            assert ids == hf(text, add_special_tokens=False)["input_ids"]
            response = text[len(prompt_text):] if text.startswith(prompt_text) else None
            if response is not None:  # Mistral's template ignores add_generation_prompt: the same
                assert hf.decode(ids[start:]) == response
            assert conversation[-1]["content"] in hf.decode(ids[start:])
        prompt_ids = hf(hf.apply_chat_template(prompt, tokenize=False), add_special_tokens=False)["input_ids"]
        assert tokenized.prefix_lengths()[i] >= len(prompt_ids)
        assert tokenized.chosen[i][: len(prompt_ids)] == tokenized.rejected[i][: len(prompt_ids)] == prompt_ids


def test_hh_strings_stay_as_they_are(tmp_path, folders):
    """Strings are used as they are, and so are pairs that mix strings with messages: the template
    renders message lists only; no BOS is added."""
    ours, hf = folders
    records = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."},
               {"prompt": "\n\nHuman: Hi", "chosen": [message("assistant", "Hello.")],
                "rejected": [message("assistant", "Go.")]}]
    pairs, _ = read_pairs_file(write_records(tmp_path / "hh.jsonl", records))
    tokenized = tokenize_pairs(pairs, ours, max_length=1000)
    texts = ["\n\nHuman: Hi\n\nAssistant: Hello.", "\n\nHuman: Hi\n\nAssistant: Hello."]
    assert tokenized.chosen == hf(texts, add_special_tokens=False)["input_ids"] == ours.encode_batch(texts)
    # after the last assistant turn; after the explicit prompt (SentencePiece decoding drops a leading space)
    assert [ours.decode(ids[start:]).strip() for ids, start in zip(tokenized.chosen, tokenized.chosen_response)] == [
        "Hello.", "Assistant: Hello."]


def test_a_system_message_opens_the_hh_text(tmp_path):
    # the HH style has no system turn: its text comes before the first "\n\nHuman:"
    (pair,), _ = read_pairs_file(write_records(tmp_path / "system.jsonl", LAYOUTS["system"]))
    assert (pair.chosen, pair.rejected) == (
        "You answer in one word.\n\nHuman: What colour is the sky?\n\nAssistant: Blue.",
        "You answer in one word.\n\nHuman: What colour is the sky?\n\nAssistant: Red.")
    late = {"prompt": [TURNS[0], SYSTEM], "chosen": [TURNS[1]], "rejected": [message("assistant", "Red.")]}
    with pytest.raises(MinqrError, match="field 'prompt' holds a message that is not"):
        read_pairs_file(write_records(tmp_path / "late.jsonl", [late]))


def test_a_refusing_template_names_the_pair(tmp_path):
    ours = load_tokenizer(write_chat_tokenizer(tmp_path / "mistral", "mistral"))
    good = LAYOUTS["explicit"][0]
    bad = {"prompt": [message("user", "Hi"), message("user", "Again")], "chosen": [message("assistant", "A")],
           "rejected": [message("assistant", "B")]}
    path = write_records(tmp_path / "pairs.jsonl", [good, bad])
    pairs, _ = read_pairs_file(path)
    with pytest.raises(MinqrError) as caught:
        tokenize_pairs(pairs, ours, max_length=100)
    assert str(caught.value) == (
        f"{path}:2: the chat template of {tmp_path / 'mistral'} refuses this conversation (Conversation roles must "
        "alternate user/assistant/user/assistant/...). " + TEMPLATE_DECIDES)


TEMPLATE_DECIDES = ("The template decides this: if it names a rule that the conversation breaks (most templates want "
                    "user and assistant turns to alternate, a system message first), fix or remove the pair; else fix "
                    "the template, or remove it to use the texts as they are")
# templates that fail in their own code, and the error each raises in Jinja's sandbox
BROKEN_TEMPLATES = {
    "huge range": ("{% for i in range(10**9) %}{% endfor %}", "OverflowError: Range too big"),
    "recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError: maximum recursion"),
    "include": ("{% include 'other.jinja' %}", "TypeError: no loader for this environment specified"),
    "import": ("{% import 'macros.jinja' as m %}", "TypeError: no loader for this environment specified"),
    "division": ("{{ messages | length / 0 }}", "ZeroDivisionError: division by zero"),
    # the bounds of minqr/models/template_limits.py, made small here (2 s, 100,000 characters)
    "endless loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                      "RenderLimitExceeded: rendering took more than 2 s (a loop that does not end?)"),
    "endless output": ("{% for i in range(100000) %}{{ messages[0]['content'] }}{% endfor %}",
                       "RenderLimitExceeded: it writes more than 100,000 characters"),
    "huge string": ("{{ 'x' * 10**10 }}", "RenderLimitExceeded: it makes a value of 10,000,000,000 items"),
    "doubling": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
                 "RenderLimitExceeded: it makes a value of 131,072 items"),
    "huge power": ("{{ 10 ** (10 ** 12) }}", "RenderLimitExceeded: it makes a value of 1,000,000,000,000 digits"),
    # what the bounds once missed: a concatenation, a method's and a filter's results, an integer product
    "tilde doubling": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}", "RenderLimitExceeded: it makes a value of 131,072 characters"),
    # widths are checked before the padding is made (the allocation would come first)
    "a padding method": ("{{ 'x'.center(10**12) }}", "RenderLimitExceeded: it makes a value of 1,000,000,000,000 "
                                                     "characters"),
    "a % width": ("{{ '%400000000s' % 'a' }}", "RenderLimitExceeded: it makes a value of 400,000,000 characters"),
    "a |format width": ("{{ '%200000000s'|format('a') }}", "RenderLimitExceeded: it makes a value of 200,000,000 "
                                                           "characters"),
    "a str.format width": ("{{ '{:>300000000.2f}'.format(1.5) }}", "RenderLimitExceeded: it makes a value of "
                                                                   "300,000,000 characters"),
    "a filter's result": ("{{ (['x' * 1000] * 20000) | join }}", "RenderLimitExceeded: it makes a value of "
                                                                 "20,000,000 characters"),
    # sizes told before they are made: each of these allocated gigabytes first, or ran for hours in one call
    "placeholder text": ("{{ lipsum(10**8) | length }}", "'lipsum' is undefined"),
    "a |center width": ("{{ 'x' | center(4000000000) }}", "RenderLimitExceeded: it makes a value of 4,000,000,000 "
                                                          "characters"),
    "a |batch fill": ("{{ ([1] | batch(400000000, 0) | first) | length }}", "RenderLimitExceeded: it makes a value "
                                                                            "of 400,000,000 characters"),
    "a replace": ("{{ ('x' * 50000).replace('x', 'y' * 50000) }}", "RenderLimitExceeded: it makes a value of "
                                                                  "2,500,000,000 characters"),
    "a |replace": ("{{ ('x' * 50000) | replace('x', 'y' * 50000) }}", "RenderLimitExceeded: it makes a value of "
                                                                     "2,500,000,000 characters"),
    "a str.join": ("{{ ('y' * 50000).join(['x'] * 50000) }}", "RenderLimitExceeded: it makes a value of "
                                                              "2,500,000,000 characters"),
    "expandtabs": ("{{ ('\t' * 50000).expandtabs(100000) }}", "RenderLimitExceeded: it makes a value of "
                                                              "5,000,050,000 characters"),
    "integer products": ("{% set ns = namespace(x=7 ** 1000) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
                         "{% endfor %}", "RenderLimitExceeded: it makes a value of 13,522 digits, more than 10,000"),
}


@pytest.mark.parametrize("name", BROKEN_TEMPLATES)
def test_whatever_a_template_raises_is_its_refusal_named_with_the_template(tmp_path, name, monkeypatch):
    """Every exception of a template's code, and every bound on its time and output, is the same
    one-line refusal naming the pair and the template (it used to be a traceback, or a hang)."""
    source, error = BROKEN_TEMPLATES[name]
    monkeypatch.setattr(template_limits, "RENDER_SECONDS", 2.0)
    monkeypatch.setattr(template_limits, "MAX_RENDERED_CHARS", 100_000)
    folder = write_chat_tokenizer(tmp_path / "tok", "chatml")
    (folder / "chat_template.jinja").write_text(source)
    ours = load_tokenizer(folder)
    path = write_records(tmp_path / "pairs.jsonl", LAYOUTS["implicit"])
    pairs, _ = read_pairs_file(path)
    started = time.monotonic()
    with pytest.raises(MinqrError) as caught:
        tokenize_pairs(pairs, ours, max_length=100)
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert message.startswith(f"{path}:1: the chat template of {folder} refuses this conversation ({error}"), message
    assert message.endswith(TEMPLATE_DECIDES)


def test_a_template_that_drops_the_response_is_refused(tmp_path):
    """A template that leaves the final response out renders chosen and rejected alike: refused after
    rendering, not trained on at accuracy 0.5."""
    folder = write_chat_tokenizer(tmp_path / "tok", "chatml")
    (folder / "chat_template.jinja").write_text(
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}{% endif %}"
        "{% endfor %}")
    path = write_records(tmp_path / "pairs.jsonl", LAYOUTS["implicit"])
    pairs, _ = read_pairs_file(path)
    assert all(pair.chosen != pair.rejected for pair in pairs)
    with pytest.raises(MinqrError) as caught:
        tokenize_pairs(pairs, load_tokenizer(folder), max_length=100)
    assert str(caught.value).startswith(f"{path}:1: the chat template of {folder} renders the chosen and the "
                                        "rejected conversation as the same text")


def test_eos_and_pad_from_the_config_files(tmp_path):
    folder = write_chat_tokenizer(tmp_path / "llama3", "llama3")
    tok = load_tokenizer(folder)  # eos_token as an AddedToken dict; no pad_token: EOS pads
    assert (tok.eos_token, tok.pad_token) == ("<|eot_id|>", "<|eot_id|>") and tok.pad_id == tok.eos_id
    assert tok.eos_id == tok.backend.token_to_id("<|eot_id|>")
    chatml = load_tokenizer(write_chat_tokenizer(tmp_path / "chatml", "chatml"))
    assert (chatml.eos_token, chatml.pad_token) == ("<|im_end|>", "<|endoftext|>")
    # no eos_token in tokenizer_config.json: config.json's eos_token_id, the first of a list
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    end_of_text = tok.backend.token_to_id("<|endoftext|>")
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [end_of_text, tok.eos_id]}))
    assert load_tokenizer(folder).eos_token == "<|endoftext|>"
    # an id that is no token id is not taken: true (an int to Python: token 1) and -1 (an OverflowError
    # in the tokenizer) fall back to <|endoftext|>
    for bad in (True, -1, 2 ** 70):
        (folder / "config.json").write_text(json.dumps({"eos_token_id": bad}))
        assert load_tokenizer(folder).eos_token == "<|endoftext|>"
    # neither names one, and there is no <|endoftext|>: nothing says where a text ends
    (folder / "config.json").write_text(json.dumps({"eos_token_id": None}))
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|endoftext|>"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(MinqrError) as caught:
        load_tokenizer(folder)
    assert str(caught.value) == (
        f"no end-of-text token in {folder}: tokenizer_config.json names no eos_token, config.json no eos_token_id "
        "the tokenizer has, and the tokenizer has no <|endoftext|> token (GPT-2's); write the token that ends a text "
        f"as eos_token into {folder / 'tokenizer_config.json'}")
    config["eos_token"] = "<|not-there|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(MinqrError) as caught:
        load_tokenizer(folder)
    assert str(caught.value) == (f"{folder}: the tokenizer has no <|not-there|> token, its end of text token: "
                                 "name one it has")


def test_saved_folder_keeps_template_eos_and_pad(tmp_path, style):
    tok = load_tokenizer(write_chat_tokenizer(tmp_path / "src", style))
    tok.save(tmp_path / "saved")
    again, hf = load_tokenizer(tmp_path / "saved"), transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    conversation = TURNS if style == "mistral" else CONVERSATIONS["system"]
    assert again.chat_template.render(conversation) == tok.chat_template.render(conversation) == (
        hf.apply_chat_template(conversation, tokenize=False))
    assert (hf.eos_token_id, hf.pad_token_id) == (again.eos_id, again.pad_id) == (tok.eos_id, tok.pad_id)


def test_template_file_and_named_templates(tmp_path):
    folder = write_chat_tokenizer(tmp_path / "zephyr", "zephyr")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"},
                               {"name": "default", "template": ZEPHYR}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    expected = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(TURNS, tokenize=False)
    assert load_tokenizer(folder).chat_template.render(TURNS) == expected
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(MinqrError, match='chat_template must be a Jinja string, or a list of {"name", "template"} '
                                         'with one named "default"'):
        load_tokenizer(folder)
    (folder / "chat_template.jinja").write_text(LLAMA3)  # newer transformers' file wins
    assert load_tokenizer(folder).chat_template.render(TURNS[:1]).startswith("<s><|start_header_id|>user")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(MinqrError, match="the chat template is no valid Jinja"):
        load_tokenizer(folder)
    (folder / "chat_template.jinja").write_text("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}")
    with pytest.raises(MinqrError, match="the chat template nests too deep to compile"):
        load_tokenizer(folder)
    (folder / "chat_template.jinja").write_bytes(b"{{ '\xff' }}")
    with pytest.raises(MinqrError, match=r"chat_template\.jinja is not UTF-8 text \(invalid start byte at byte 4\)"):
        load_tokenizer(folder)


def test_the_rendering_is_said(tmp_path, folders):
    """Whether conversations went through the chat template or the HH style is said, never silent."""
    ours, _ = folders
    records = [*LAYOUTS["implicit"], {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi"}]
    pairs, _ = read_pairs_file(write_records(tmp_path / "pairs.jsonl", records))
    assert rendering_note(pairs, ours.chat_template) == "2 conversations rendered with the tokenizer's chat template"
    assert rendering_note(pairs, None) == ('2 conversations rendered with the HH style ("\\n\\nHuman: ...\\n\\n'
                                           'Assistant: ..."): the tokenizer has no chat template')
    assert rendering_note(pairs[2:], ours.chat_template) is None


def test_an_anchor_reply_is_rendered_as_the_responses_are(tmp_path, folders, style):
    """score --anchor-reply: the reply follows each pair's prompt in the same rendering as its
    responses: the chat template's for conversations, the HH text for strings."""
    ours, hf = folders
    records = [*LAYOUTS["explicit"], {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}]
    if refuses(style, records[0]["prompt"]):
        return
    pairs, _ = read_pairs_file(write_records(tmp_path / "pairs.jsonl", records))
    for pair, record in zip(pairs[:2], records):
        expected = hf.apply_chat_template(record["prompt"] + [message("assistant", "ok")], tokenize=False)
        assert reply_text(pair, "ok", ours.chat_template) == expected
    assert reply_text(pairs[2], " ok", ours.chat_template) == "\n\nHuman: Hi\n\nAssistant: ok"


def test_a_prompt_and_its_replies_read_as_training_reads_a_pair(tmp_path, folders, style):
    """prompt_reply_texts (the reward functions', best-of-N's) gives a pair's two sides the texts that
    training's reading of the same record gives them: the template's for message lists throughout
    (transformers' apply_chat_template), the HH text of both sides as soon as a string is among
    them, strings as they are; without a template, the HH text of every message list."""
    ours, hf = folders
    prompt, reply, other = TURNS[:1], [message("assistant", "Blue.")], [message("assistant", "Red.")]
    records = [{"prompt": prompt, "chosen": reply, "rejected": other},
               {"prompt": "\n\nHuman: What colour is the sky?", "chosen": reply, "rejected": other},
               {"prompt": prompt, "chosen": "\n\nAssistant: Blue.", "rejected": "\n\nAssistant: Red."},
               {"prompt": prompt, "chosen": reply, "rejected": "\n\nAssistant: Red."},
               {"prompt": "\n\nHuman: Hi", "chosen": "\n\nAssistant: Blue.", "rejected": "\n\nAssistant: Red."}]
    pairs, _ = read_pairs_file(write_records(tmp_path / "pairs.jsonl", records))
    tokenized = tokenize_pairs(pairs, ours, max_length=1000)
    for i, record in enumerate(records):
        texts, hh = prompt_reply_texts(record["prompt"], [record["chosen"], record["rejected"]], ours.chat_template,
                                       "test")
        assert [ours.encode(text) for text in texts] == [tokenized.chosen[i], tokenized.rejected[i]]  # training's
        assert hh == (0 < i < 4)
        if i == 0:
            assert texts == [hf.apply_chat_template(prompt + side, tokenize=False) for side in (reply, other)]
    assert prompt_reply_texts(prompt, [reply], None, "test") == (
        ["\n\nHuman: What colour is the sky?\n\nAssistant: Blue."], True)
    assert prompt_reply_texts("a", ["b", "c"], ours.chat_template, "test") == (["ab", "ac"], False)


def test_texts_that_end_in_the_pad_token_are_said(tmp_path):
    """Llama 3's template closes each turn with <|eot_id|>, its EOS, which pads when the tokenizer
    has no pad of its own: every text then ends in the pad id, and training says what that means
    for transformers. ChatML's tokenizer pads with a token of its own: nothing to say."""
    path = write_records(tmp_path / "pairs.jsonl", LAYOUTS["implicit"])
    config = SimpleNamespace(skip_bad=False, annotator_field=None, max_length=128)
    for style, ending in (("llama3", 2 * len(LAYOUTS["implicit"])), ("chatml", 0)):
        tokenizer = load_tokenizer(write_chat_tokenizer(tmp_path / style, style))
        said = []
        tokenized = load_pairs(path, "train", tokenizer, config, said.append)
        assert tokenized.ending_in_pad() == ending
        assert sum(line.startswith(f"train: note: {ending:,} texts end in the pad token (id {tokenizer.pad_id};")
                   for line in said) == (ending > 0), said
