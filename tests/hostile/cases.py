"""The hostile-input corpus: what each child process (run_case.py) is given and runs.

A ``Case`` is Python code for the child plus the files it needs. The code sees the names
that run_case.py provides: ``Phi3Generator``, ``MODEL`` and ``TOKENIZER`` (paths), ``gen``
(in batched cases, the generator the batch shares), ``PROMPT``, ``MESSAGES``,
``first_tokens(gen)``, ``chat_both_ways(gen)``, ``HugeLen``, ``StrSubclass``, ``pathlib``.

Each file case (a malformed GGUF, tokenizer file or chat template) runs alone in its own
process; argument cases share a process and a loaded model by ``batch``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf_mutations as gm
from phi3_fixtures import added_token

FileMaker = Callable[[Path], object]  # makes a file (or not-a-file) at the path

LOAD = "gen = Phi3Generator(MODEL, tokenizer=TOKENIZER)\n"
LOAD_AND_RUN = LOAD + "first_tokens(gen)"
LOAD_AND_CHAT = LOAD + "chat_both_ways(gen)"

BATCH_SIZE = 25


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    code: str
    model: FileMaker | None = None  # makes the MODEL file; None: the fixture model
    tokenizer: FileMaker | None = None  # makes the TOKENIZER file; None: the fixture's
    batch: str | None = None  # cases with the same batch share one process and `gen`
    imports: tuple[str, ...] = ()  # modules the child imports before its memory limit
    must_succeed: bool = False  # a control: the harness is wrong if it fails

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


@dataclass(frozen=True)
class Fixtures:
    model: Path  # the conftest tiny Q8_0 Phi-3 (context 1024)
    kquant_model: Path  # Q4_K, hidden 256, LongRoPE factors, tied output, sliding window
    tokenizer: Path


def build_corpus(fixtures: Fixtures, seed: int) -> list[Case]:
    cases = [
        *_controls(fixtures),
        *_gguf_cases(fixtures, seed),
        *_file_kind_cases(fixtures),
        *_tokenizer_cases(fixtures, seed),
        *_template_cases(fixtures),
        *_argument_cases(),
    ]
    ids = [case.id for case in cases]
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates, f"duplicate case ids: {sorted(duplicates)}"
    return cases


def writes(make: Callable[[], bytes]) -> FileMaker:
    """A FileMaker writing ``make()``'s bytes, made only when the case is about to run."""
    return lambda path: path.write_bytes(make())


def _controls(fixtures: Fixtures) -> list[Case]:
    """Valid inputs, which must succeed under the same limits: if one fails, the limits or
    the harness are wrong, not candle_phi."""
    phi3 = gm.Gguf.parse(fixtures.model.read_bytes())
    template = gm.gguf_string(PHI3_TEMPLATE)
    return [
        Case("control", "fixture_model", LOAD_AND_RUN, must_succeed=True),
        Case(
            "control",
            "kquant_model",
            LOAD_AND_RUN,
            model=writes(fixtures.kquant_model.read_bytes),
            must_succeed=True,
        ),
        Case(
            "control",
            "phi3_chat_template",
            LOAD_AND_CHAT,
            model=writes(
                lambda: phi3.with_kv("tokenizer.chat_template", gm.ValueType.STRING, template)
            ),
            must_succeed=True,
        ),
        Case(
            "control",
            "batched_generate",
            "gen.generate(PROMPT, max_tokens=2, seed=0).read()",
            batch="control",
            must_succeed=True,
        ),
    ]


# --------------------------------------------------------------------------- GGUF files


def _gguf_cases(fixtures: Fixtures, seed: int) -> list[Case]:
    phi3 = gm.Gguf.parse(fixtures.model.read_bytes())
    kquant = gm.Gguf.parse(fixtures.kquant_model.read_bytes())
    mutations = [*gm.malformed_ggufs(phi3, seed), *gm.malformed_kquant_ggufs(kquant)]
    return [
        Case(f"gguf/{m.category}", m.name, LOAD_AND_RUN, model=writes(m.make)) for m in mutations
    ]


def _file_kind_cases(fixtures: Fixtures) -> list[Case]:
    """Paths that are not regular files, or the other file: reading them must fail, not
    block."""
    kinds: dict[str, FileMaker] = {
        "named_pipe": lambda path: os.mkfifo(path),
        "directory": lambda path: path.mkdir(),
        "symlink_loop": lambda path: path.symlink_to(path),
        "dangling_symlink": lambda path: path.symlink_to(path.with_name("nowhere")),
        "dev_zero": lambda path: path.symlink_to("/dev/zero"),
        "dev_urandom": lambda path: path.symlink_to("/dev/urandom"),
    }
    model_kinds = kinds | {"the_tokenizer": lambda path: path.symlink_to(fixtures.tokenizer)}
    tokenizer_kinds = kinds | {"the_model": lambda path: path.symlink_to(fixtures.model)}
    return [
        *(Case("gguf/file_kind", k, LOAD_AND_RUN, model=m) for k, m in model_kinds.items()),
        *(
            Case("tokenizer", f"file_kind_{k}", LOAD_AND_RUN, tokenizer=m)
            for k, m in tokenizer_kinds.items()
        ),
    ]


# --------------------------------------------------------------------------- tokenizer files


def _tokenizer_cases(fixtures: Fixtures, seed: int) -> list[Case]:
    text = fixtures.tokenizer.read_text(encoding="utf-8")

    def raw(data: bytes) -> FileMaker:
        return lambda path: path.write_bytes(data)

    def edited(edit: Callable[[dict[str, Any]], object]) -> FileMaker:
        """The fixture tokenizer.json, edited when the case is about to run."""

        def make(path: Path) -> None:
            doc = json.loads(text)
            edit(doc)
            # ensure_ascii: lone surrogates are written as JSON \u escapes.
            path.write_text(json.dumps(doc, ensure_ascii=True), encoding="ascii")

        return make

    def replaced(*keys: str, value: object) -> FileMaker:
        """The fixture with the value at a key path set."""

        def edit(doc: dict[str, Any]) -> None:
            for key in keys[:-1]:
                doc = doc[key]
            doc[keys[-1]] = value

        return edited(edit)

    def added(tokens: Callable[[], list[dict[str, Any]]]) -> FileMaker:
        return edited(lambda doc: doc["added_tokens"].extend(tokens()))

    def without_end_tokens(doc: dict[str, Any]) -> None:
        ends = ("<|end|>", "<|endoftext|>", "</s>")
        doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] not in ends]
        for token in ends:
            del doc["model"]["vocab"][token]

    bos = ("post_processor", "special_tokens", "<s>", "ids")
    padding = {"direction": "Right", "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"}
    files: dict[str, FileMaker] = {
        "empty": raw(b""),
        "binary_garbage": raw(random.Random(seed).randbytes(4096)),
        "invalid_json": raw(b"{"),
        "not_json": raw(b"hello"),
        "truncated_half": raw(text.encode()[: len(text) // 2]),
        "truncated_last_byte": raw(text.encode()[:-1]),
        "json_null": raw(b"null"),
        "json_number": raw(b"42"),
        "json_list": raw(b"[]"),
        "json_string": raw(b'"tokenizer"'),
        "utf8_bom": raw(b"\xef\xbb\xbf" + text.encode()),
        "nested_10^5_deep": raw(b"[" * 10**5 + b"]" * 10**5),
        "not_utf8": raw(text.encode().replace(b'"<unk>"', b'"<\xff\xfe>"')),
        "lone_surrogate_token": replaced("model", "vocab", "\ud800", value=32063),
        "model_is_a_list": replaced("model", value=[]),
        "vocab_is_a_list": replaced("model", "vocab", value=[]),
        "merges_is_a_number": replaced("model", "merges", value=5),
        "added_tokens_is_an_object": replaced("added_tokens", value={}),
        "added_token_id_is_a_string": edited(lambda d: d["added_tokens"][0].update(id="0")),
        # Ids past the model's 32064 rows, or past what a u32 holds.
        "vocab_id_negative": replaced("model", "vocab", "zz", value=-1),
        "vocab_id_2^32": replaced("model", "vocab", "zz", value=2**32),
        "vocab_id_2^64": replaced("model", "vocab", "zz", value=2**64),
        "vocab_id_float": replaced("model", "vocab", "zz", value=1.5),
        "vocab_id_at_model_vocab_size": replaced("model", "vocab", "zz", value=32064),
        "vocab_id_10^9": replaced("model", "vocab", "zz", value=10**9),
        "added_token_id_10^6": added(lambda: [added_token(10**6, "<|x|>")]),
        "added_token_id_u32_max": added(lambda: [added_token(2**32 - 1, "<|x|>")]),
        "post_processor_bos_10^9": replaced(*bos, value=[10**9]),
        "post_processor_bos_u32_max": replaced(*bos, value=[2**32 - 1]),
        # Huge added-token lists.
        "added_tokens_10^5_past_vocab": added(
            lambda: [added_token(40000 + i, f"<|a{i}|>") for i in range(10**5)]
        ),
        "added_tokens_10^5_within_vocab": added(
            lambda: [added_token(3 + i % 32000, f"<|a{i}|>", special=False) for i in range(10**5)]
        ),
        # Well-formed, but not this model's, or not usable.
        "special_token_not_the_models": added(lambda: [added_token(32007, "<|fin|>")]),
        "no_end_tokens": edited(without_end_tokens),
        "unknown_model_type": replaced("model", "type", value="Foo"),
        "empty_word_level": replaced(
            "model", value={"type": "WordLevel", "vocab": {}, "unk_token": "<unk>"}
        ),
        "empty_bpe": edited(lambda d: d["model"].update(vocab={}, merges=[])),
        "merges_of_unknown_tokens": edited(lambda d: d["model"]["merges"].append("qq zz")),
        "normalizer_invalid_regex": replaced(
            "normalizer", value={"type": "Replace", "pattern": {"Regex": "("}, "content": "x"}
        ),
        "pre_tokenizer_backtracking_regex": replaced(
            "pre_tokenizer",
            value={
                "type": "Split",
                "pattern": {"Regex": "(?=(a+)+b)a"},
                "behavior": "Isolated",
                "invert": False,
            },
        ),
        "decoder_unknown_type": replaced("decoder", value={"type": "Foo"}),
        "truncation_to_0": replaced(
            "truncation",
            value={"direction": "Right", "max_length": 0, "strategy": "LongestFirst", "stride": 0},
        ),
        "truncation_stride_past_max": replaced(
            "truncation",
            value={"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 8},
        ),
        "padding_to_10^9": replaced(
            "padding", value={"strategy": {"Fixed": 10**9}, "pad_to_multiple_of": None, **padding}
        ),
        "padding_multiple_of_0": replaced(
            "padding", value={"strategy": "BatchLongest", "pad_to_multiple_of": 0, **padding}
        ),
    }
    code = LOAD_AND_RUN + "\ngen.tokenize('a' * 64)"
    return [Case("tokenizer", name, code, tokenizer=make) for name, make in files.items()]


# --------------------------------------------------------------------------- chat templates

# Phi-3-mini-4k-instruct's own template.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

_LOOP_I = "{% for i in range(100000) %}"
_LOOP_J = "{% for j in range(100000) %}"

HOSTILE_TEMPLATES = {
    # Work without end: 10^10 iterations, 2^40 macro calls, recursion without base.
    "nested_loops_10^10": f"{_LOOP_I}{_LOOP_J}{{% endfor %}}{{% endfor %}}",
    "nested_loops_10^10_output": f"{_LOOP_I}{_LOOP_J}x{{% endfor %}}{{% endfor %}}",
    "macro_calls_2^40": (
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(40) }}"
    ),
    "macro_recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "macro_mutual_recursion": (
        "{% macro a(n) %}{{ b(n) }}{% endmacro %}{% macro b(n) %}{{ a(n) }}{% endmacro %}"
        "{{ a(0) }}"
    ),
    "recursive_loop_without_end": (
        "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}"
    ),
    "range_2^63": "{% for i in range(2**63) %}{% endfor %}",
    "range_step_0": "{{ range(0, 10, 0) | list }}",
    # Output and memory without bound.
    "special_tokens_10^5": "{% for i in range(100000) %}<|end|>{% endfor %}",
    "special_token_strings_10^5": "{% for i in range(100000) %}{{ '<|user|>' }}{% endfor %}",
    "doubling_string_64_times": (
        "{% set ns = namespace(s='x') %}"
        "{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"
    ),
    "doubling_list_64_times": (
        "{% set ns = namespace(l=[0]) %}"
        "{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}"
    ),
    # Values nested nearly as deep as the fuel allows (2,000 x 40 levels, then one more
    # instruction): printing, serialising, comparing and dropping them recurse once per
    # level (the sandbox's stack grows with its fuel).
    **{
        f"nested_list_{use}": (
            "{% set ns = namespace(x=0) %}{% for i in range(2000) %}"
            "{% set ns.x = " + "[" * 40 + "ns.x" + "]" * 40 + " %}{% endfor %}" + expr
        )
        for use, expr in [
            ("printed", "{{ ns.x }}"),
            ("tojson", "{{ ns.x | tojson }}"),
            ("compared", "{{ ns.x == ns.x }}"),
            ("dropped", "x"),
        ]
    },
    "string_times_10^12": "{{ 'x' * 1000000000000 }}",
    "list_times_10^12": "{{ ([1] * 1000000000000) | length }}",
    "range_10^9_list": "{{ range(1000000000) | list | length }}",
    "indent_10^9": "{{ 'a\nb' | indent(1000000000) }}",
    "center_10^12": "{{ 'x'.center(1000000000000) }}",
    "join_10^10_bytes": "{{ range(100000) | join('x' * 100000) }}",
    "replace_empty_10^9_bytes": "{{ ('x' * 1000) | replace('', 'y' * 1000000) }}",
    "tojson_indent_10^9": "{{ messages | tojson(indent=1000000000) }}",
    "format_width_10^12": "{{ '%1000000000000d' | format(1) }}",
    # Arithmetic at the edges.
    "pow_10^6_digits": "{{ 2 ** 1000000 }}",
    "pow_tower": "{{ 10 ** 10 ** 10 }}",
    "floor_div_by_0": "{{ 1 // 0 }}",
    "mod_by_0": "{{ 1 % 0 }}",
    "i64_min_div_minus_1": "{{ -9223372036854775808 // -1 }}",
    "i128_min_div_minus_1": "{{ -170141183460469231731687303715884105728 // -1 }}",
    # Errors a template raises on purpose or by mistake.
    "raise_exception": "{{ raise_exception('boom') }}",
    "undefined_attribute_chain": "{{ missing.attr.attr }}",
    "undefined_call": "{{ missing() }}",
    "message_index_past_end": "{{ messages[100000].content }}",
    "strftime_now": "{{ strftime_now('%Y-%m-%d') }}",
    "include_missing": "{% include 'other.j2' %}",
    "import_missing": "{% import 'macros.j2' as m %}{{ m.f() }}",
    "syntax_unclosed_for": "{% for m in messages %}",
    "syntax_unclosed_expression": "{{",
    "syntax_stray_endfor": "{% endfor %}",
    "syntax_empty_if": "{% if %}{% endif %}",
    "lone_surrogate_escape": "{{ '\\ud800' }}",
    # Size and depth.
    "literal_1_MiB": "x" * 2**20,
    "expressions_1_MiB": "{{ 'a' }}" * (2**20 // 9),
    "nested_ifs_10^4": "{% if true %}" * 10**4 + "x" + "{% endif %}" * 10**4,
    "nested_parentheses_10^5": "{{ " + "(" * 10**5 + "1" + ")" * 10**5 + " }}",
    "nested_lists_10^5": "{{ " + "[" * 10**5 + "]" * 10**5 + " }}",
    "filters_10^5": "{{ 'x'" + " | upper" * 10**5 + " }}",
    "nots_10^5": "{{ " + "not " * 10**5 + "true }}",
    "nul_inside": "a\x00b{{ messages[0].content }}",
    "empty": "",
}  # fmt: skip


def _template_cases(fixtures: Fixtures) -> list[Case]:
    phi3 = gm.Gguf.parse(fixtures.model.read_bytes())

    def with_template(template: str) -> FileMaker:
        payload = gm.gguf_string(template)
        return writes(lambda: phi3.with_kv("tokenizer.chat_template", gm.ValueType.STRING, payload))

    return [
        Case("template", name, LOAD_AND_CHAT, model=with_template(template))
        for name, template in HOSTILE_TEMPLATES.items()
    ]


# --------------------------------------------------------------------------- arguments

# Edge values as Python source, evaluated in the child.
INTS = [
    "-1", "0", "2**31", "2**63 - 1", "2**63", "2**64", "10**100", "-(10**100)", "True",
    "1.5", "float('nan')", "float('inf')", "'1'", "b'1'", "[]", "object()",
    "numpy.int64(2)", "numpy.uint64(2**64 - 1)",
]  # fmt: skip
FLOATS = [
    "float('nan')", "float('inf')", "float('-inf')", "-1.0", "0.0", "-0.0", "5e-324",
    "1e-45", "1e308", "10**400", "2**64", "True", "'0.5'", "b'x'", "None", "[]", "object()",
    "numpy.float32('nan')", "numpy.float64(1e308)",
]  # fmt: skip
BOOLS = ["1", "'yes'", "None", "[]", "object()", "float('nan')", "numpy.bool_(True)"]
TEXTS = [
    "''", "'\\ud800'", "'a\\udfffb'", "'\\ud800\\udc00'", "'\\x00'", "'x' * 10**6",
    "'é' * 10**5", "'<|end|>' * 10**5", "'\\U0010ffff' * 1000", "'\\u202e\\ufeff'",
    "b'x'", "bytearray(b'x')", "None", "1", "object()", "['a']", "StrSubclass('hi')",
]  # fmt: skip
TOKEN_IDS = [
    "[]", "[-1]", "[2**32]", "[2**32 - 1]", "[2**64]", "[10**100]", "[32064]", "[10**6]",
    "[True]", "[1.5]", "[float('nan')]", "['a']", "[None]", "[[1]]", "(1, 2)", "{1: 2}",
    "iter([1, 2])", "'abc'", "b'abc'", "object()", "HugeLen()", "[numpy.int64(5)]",
]  # fmt: skip
STOPS = [
    "''", "['']", "'\\ud800'", "['\\ud800']", "['ok', '\\ud800']", "['x'] * 10**5",
    "[str(i) for i in range(10**5)]", "'x' * 10**6", "['\\x00']", "'<|end|>'",
    "['<|end|>'] * 10**5", "[None]", "[1]", "b'x'", "[b'x']", "{'a': 1}", "object()",
    "HugeLen()", "iter(['a'])",
]  # fmt: skip
MESSAGE_LISTS = [
    "[]", "[{}]", "[{'role': 'user'}]", "[{'content': 'hi'}]",
    "[{'role': 'wizard', 'content': 'hi'}]", "[{'role': '\\ud800', 'content': 'hi'}]",
    "[{'role': 'user', 'content': '\\ud800'}]", "[{'role': 'user', 'content': 'a\\udfffb'}]",
    "[{'role': 'user', 'content': None}]", "[{'role': 'user', 'content': 1}]",
    "[{'role': 'user', 'content': b'hi'}]",
    "[{'role': 'user', 'content': [{'type': 'text', 'text': 'hi'}]}]",
    "[{'role': 'user', 'content': {'a': 1}}]", "[{'role': 'user', 'content': 'x' * 10**6}]",
    "[{'role': 'user', 'content': '<|end|>' * 10**5}]",
    "[{'role': 'user', 'content': 'hi', 'name': object()}]",
    "[{'role': 'user', 'content': 'hi', 1: 2}]",
    "[{'role': 'user', 'content': 'hi'}] * 10_000",
    "[{'role': 'user', 'content': 'hi'}] * 10**5",
    "[{'role': 'user', 'content': StrSubclass('hi')}]",
    "None", "'hello'", "b'x'", "[None]", "['user']", "[('role', 'user')]", "object()",
    "{'role': 'user', 'content': 'hi'}", "HugeLen()",
]  # fmt: skip
PATHS = [
    "''", "'\\ud800'", "'\\x00'", "'a\\x00b'", "b'/x'", "1", "1.5", "object()", "[]",
    "'/'", "'/dev/null'", "'/dev/zero'", "'/nonexistent/x'", "'x' * 10**5",
    "pathlib.Path('\\udcff')",
]  # fmt: skip
LOGIT_BIASES = [
    "None", "{}", "{0: 1.0}", "{-1: 1}", "{10**20: 1}", "{2**32: 1}", "{32064: 1}",
    "{0: float('nan')}", "{0: float('inf')}", "{0: 10**400}", "{0: True}", "{True: 1}",
    "{'a': 1}", "{1.5: 1}", "{None: 1}", "{0: None}", "{0: '1'}", "[1]", "[(0, 1.0)]", "'x'",
    "object()", "HugeLen()", "{i: 1.0 for i in range(10**5)}",
    "{numpy.int64(5): numpy.float32(-100.0)}", "{numpy.uint64(2**64 - 1): 1.0}",
    # Every token banned (none left to sample or to take greedily), or every one raised.
    "{i: -100 for i in range(32064)}", "{i: 100 for i in range(32064)}",
]  # fmt: skip
HUB_STRINGS = [
    "''", "'\\ud800'", "'../../etc'", "'a/b/c/d'", "'a' * 10**5", "None", "1", "object()",
]  # fmt: skip


def _argument_cases() -> list[Case]:
    """Every parameter of the API at its edge values, one call per case."""

    def call(**arguments: str) -> str:
        """A short generation with one argument set (or overridden)."""
        listed = {"max_tokens": "2", "seed": "0"} | arguments
        return f"gen.generate(PROMPT, {', '.join(f'{k}={v}' for k, v in listed.items())}).read()"

    groups: dict[str, list[str]] = {
        "generate": [
            *(f"gen.generate({v}, max_tokens=2, seed=0).read()" for v in TEXTS + TOKEN_IDS),
            "gen.generate(range(10**9), max_tokens=2).read()",
            "gen.generate([1] * 2000, max_tokens=2).read()",
            *(call(max_tokens=v) for v in INTS),
            "next(gen.generate(PROMPT, max_tokens=None, seed=0))",  # fills the context
            *(call(**{p: v}) for p in ("top_k", "repeat_last_n") for v in [*INTS, "None"]),
            call(top_k="10**9"),
            *(call(seed=v) for v in [*INTS, "None", "2**64 - 1"]),
            *(call(**{p: v}) for p in ("temperature", "top_p", "repeat_penalty") for v in FLOATS),
            call(top_p="1.0000001"),
            call(top_p="2.0"),
            *(call(stop=v) for v in STOPS),
            *(call(stop_token_ids=v) for v in [*TOKEN_IDS, "list(range(32064))", "range(10**9)"]),
            *(call(ignore_eos=v) for v in BOOLS),
            *(
                call(**{p: v})
                for p in ("min_p", "presence_penalty", "frequency_penalty")
                for v in FLOATS
            ),
            call(min_p="1.0", temperature="5.0"),
            *(call(logit_bias=v) for v in LOGIT_BIASES),
            *(call(logit_bias=v, temperature="0") for v in LOGIT_BIASES[-2:]),
            *(call(logprobs=v) for v in BOOLS),
            *(call(logprobs="True", top_logprobs=v) for v in [*INTS, "None", "20", "21"]),
            call(top_logprobs="3"),  # without logprobs
        ],
        "chat": [
            *(f"gen.chat({v}, max_tokens=2, seed=0).read()" for v in MESSAGE_LISTS),
            "gen.chat(MESSAGES, max_tokens=2, stop=['\\ud800']).read()",
            "gen.chat(MESSAGES, max_tokens=2, temperature=float('nan')).read()",
            *(f"gen.chat(MESSAGES, truncate={v}, max_tokens=2, seed=0).read()" for v in BOOLS),
            "gen.chat(MESSAGES * 1000, truncate=True, max_tokens=2, seed=0).read()",
            "gen.chat(MESSAGES[:1] + MESSAGES[1:] * 5000, truncate=True, max_tokens=2).read()",
            "gen.chat(MESSAGES, max_tokens=2, logit_bias={0: float('nan')}).read()",
            "gen.chat(MESSAGES, max_tokens=2, logprobs=True, top_logprobs=20).read()",
        ],
        "apply_chat_template": [
            *(f"gen.apply_chat_template({v})" for v in MESSAGE_LISTS),
            *(f"gen.apply_chat_template(MESSAGES, add_generation_prompt={v})" for v in BOOLS),
        ],
        "tokenize": [
            *(f"gen.tokenize({v})" for v in TEXTS),
            *(f"gen.tokenize('hi', add_special_tokens={v})" for v in BOOLS),
        ],
        "detokenize": [
            *(
                f"gen.detokenize({v})"
                for v in [*TOKEN_IDS, "[3] * 10**6", "list(range(32064)) * 4"]
            ),
            *(f"gen.detokenize([1, 2], skip_special_tokens={v})" for v in BOOLS),
        ],
        "token_to_id": [f"gen.token_to_id({v})" for v in TEXTS],
        "logits": [
            *(f"gen.logits({v})" for v in [*TOKEN_IDS, "[1] * 2000", "range(10**9)"]),
            *(f"gen.logits([1, 2, 3], chunk_size={v})" for v in INTS),
        ],
        "constructor": [
            *(
                f"Phi3Generator({v}, tokenizer=TOKENIZER)"
                for v in [*PATHS, "MODEL + '/'", "TOKENIZER"]
            ),
            *(f"Phi3Generator(MODEL, tokenizer={v})" for v in [*PATHS, "MODEL"]),
            *(f"Phi3Generator(repo_id={v}, tokenizer=TOKENIZER)" for v in HUB_STRINGS),
            *(
                f"Phi3Generator(filename={v}, tokenizer=TOKENIZER)"
                for v in [*HUB_STRINGS, "'../../../etc/passwd'"]
            ),
            *(f"Phi3Generator(revision={v}, tokenizer=TOKENIZER)" for v in HUB_STRINGS),
            *(f"Phi3Generator(MODEL, tokenizer_repo_id={v})" for v in HUB_STRINGS),
            *(
                f"Phi3Generator(MODEL, tokenizer_repo_id='a/b', tokenizer_revision={v})"
                for v in HUB_STRINGS
            ),
            *(f"Phi3Generator(MODEL, tokenizer=TOKENIZER, progress={v})" for v in BOOLS),
            # The thread pools are sized by the batch's first generator: these are refused.
            *(f"Phi3Generator(MODEL, tokenizer=TOKENIZER, n_threads={v})" for v in INTS),
        ],
    }
    cases = []
    for group, codes in groups.items():
        for i, code in enumerate(dict.fromkeys(codes)):  # each call once
            imports = ("numpy",) if "numpy." in code else ()
            batch = f"{group}-{i // BATCH_SIZE}"
            cases.append(Case(f"args/{group}", code, code, batch=batch, imports=imports))
    # In a fresh process the first generator sizes the pools: absurd counts must be refused.
    for n in ("10**6", "2**31", "2**63 - 1"):
        code = f"first_tokens(Phi3Generator(MODEL, tokenizer=TOKENIZER, n_threads={n}))"
        cases.append(Case("args/constructor_fresh_process", f"n_threads={n}", code))
    return cases
