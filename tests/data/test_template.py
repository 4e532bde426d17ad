"""Chat templates from model files are untrusted code: rendered like transformers does, but neither
able to leave the sandbox nor to hang or flood the process."""

from __future__ import annotations

import time

import pytest

from mathtune.data.template import TemplateError, render_chat
from mathtune.data.tokenize import BUILTIN_TEMPLATES
from tests.conftest import CHATML, build_chatml_tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12*7?"},
    {"role": "assistant", "content": "84"},
]


@pytest.fixture
def tokenizer():
    return build_chatml_tokenizer()


def render(tokenizer, template: str, seconds: float = 1.0) -> str:
    tokenizer.chat_template = template
    return render_chat(tokenizer, MESSAGES, seconds=seconds)


# What a real template gets: the messages, add_generation_prompt and the special tokens.
MISTRAL_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
TOOLS_AWARE = "{% if tools %}T{% endif %}{{ messages | tojson }}{% if add_generation_prompt %}>{% endif %}"


@pytest.mark.parametrize("template", [CHATML, BUILTIN_TEMPLATES["plain"], MISTRAL_LIKE, TOOLS_AWARE])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_renders_exactly_like_transformers(tokenizer, template, add_generation_prompt):
    tokenizer.chat_template = template
    expected = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert render_chat(tokenizer, MESSAGES, add_generation_prompt) == expected


def test_the_real_smollm2_template_renders_like_transformers(smollm_gguf, model_cache):
    from mathtune.config import ModelConfig
    from mathtune.model.load import load_model

    _, tok, _ = load_model(ModelConfig(path=str(smollm_gguf), cache_dir=model_cache))
    assert render_chat(tok, MESSAGES[1:], True) == tok.apply_chat_template(MESSAGES[1:], tokenize=False,
                                                                           add_generation_prompt=True)


ESCAPES = {
    "class mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler globals": "{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}",
    "joiner globals": "{{ joiner.__init__.__globals__['os'].system('touch PWNED') }}",
    "namespace globals": "{{ namespace.__init__.__globals__ }}",
    "dict builtins": "{{ dict.__call__.__globals__ }}",
    "raise_exception globals": "{{ raise_exception.__globals__['__builtins__']['__import__']('os') }}",
    "message attribute": "{{ messages[0].__class__.__base__.__subclasses__() }}",
    "namespace store": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "format attribute": "{{ '{0.__class__.__mro__}'.format('') }}x",
}


@pytest.mark.parametrize("template", ESCAPES.values(), ids=ESCAPES.keys())
def test_a_template_cannot_reach_python_internals(tokenizer, template, tmp_path):
    pwned = tmp_path / "pwned"
    try:
        out = render(tokenizer, template.replace("PWNED", str(pwned)))
    except TemplateError as exc:
        assert "sandbox" in str(exc) or "failed" in str(exc)
    else:
        # str.format goes through Jinja's sandboxed formatter: the attribute lookup yields nothing.
        assert "class" not in out and "object" not in out
    assert not pwned.exists()


DOUBLING = "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}"
DOUBLING_MACRO = ("{% macro d(s, n) %}{% if n %}{% set t %}{{ s }}{{ s }}{% endset %}{{ d(t, n - 1) }}{% else %}"
                  "{{ s|length }}{% endif %}{% endmacro %}{{ d('ab', 60) }}")
SELF_DOUBLING_LIST = "{% set ns = namespace(l=['a' * 100]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"

HOGS = {
    "range of a billion": "{% for i in range(10**9) %}{% endfor %}",
    "nested ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a list": "{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}x{% endfor %}{% endfor %}",
    "string times ten billion": "{{ 'a' * 10**10 }}",
    "string times times": "{{ 'a' * 100000 * 100000 }}",
    "list times": "{{ ([0] * 100000 * 100000)|length }}",
    "huge power": "{{ 7 ** 100000000 }}",
    "squaring loop": "{% set ns = namespace(x=10**5) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "doubling loop": DOUBLING,
    "lipsum": "{{ lipsum(10**7) }}",
    "center filter": "{{ 'x'|center(10**9) }}",
    "ljust method": "{{ 'x'.ljust(10**9) }}",
    "printf width": "{{ '%0999999999d' % 1 }}",
    "format filter width": "{{ '%09999999999d'|format(1) }}",
    "str.format width": "{{ '{:>99999999999}'.format('') }}",
    "replace blow-up": "{% set s = 'a' * 1000000 %}{{ s|replace('a', 'b' * 1000) }}",
    "join blow-up": "{% set s = 'a' * 1000000 %}{{ s.join(range(100000)|map('string')|list) }}",
    "indent blow-up": "{% set s = '\\n' * 1000000 %}{{ s|indent(1000000) }}",
    "recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "doubling through set blocks": DOUBLING_MACRO,
    "output flood": "{% set s = 'a' * 1000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
    "tojson of a self-doubling list": SELF_DOUBLING_LIST + "{{ ns.l|tojson }}",
    "printing a self-doubling list": SELF_DOUBLING_LIST + "{{ ns.l }}",
    "joining a self-doubling list": SELF_DOUBLING_LIST + "{{ ns.l|join }}",
}


@pytest.mark.parametrize("template", HOGS.values(), ids=HOGS.keys())
def test_a_template_cannot_hang_or_flood_the_process(tokenizer, template):
    started = time.perf_counter()
    with pytest.raises(TemplateError, match="chat template"):
        render(tokenizer, template, seconds=1.0)
    assert time.perf_counter() - started < 3.0


@pytest.mark.parametrize("template", [DOUBLING, DOUBLING_MACRO, HOGS["output flood"]], ids=["~", "set block", "output"])
def test_a_doubling_template_fails_on_size_fast_with_little_memory(tokenizer, template):
    # Before the size bound, the `~` loop was stopped by the clock after 4.6 s and 1.5 GiB; the
    # output flood after 9.6 s and 2.9 GiB (scripts in the issue 19 report).
    import tracemalloc

    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(TemplateError, match="would build a value of"):
            render(tokenizer, template, seconds=5.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2.0
    assert peak < 100 << 20, f"{peak / 2**20:.0f} MiB"


def test_the_time_budget_message_names_the_fix(tokenizer):
    with pytest.raises(TemplateError) as excinfo:
        render(tokenizer, HOGS["nested ranges"], seconds=0.2)
    assert "ran past its time budget" in str(excinfo.value)
    assert "model.chat_template" in str(excinfo.value)


def test_a_long_conversation_is_not_mistaken_for_a_flood(tokenizer):
    long = [{"role": "user", "content": "x" * 12_000_000}, {"role": "assistant", "content": "84"}]
    tokenizer.chat_template = CHATML
    assert len(render_chat(tokenizer, long)) > 12_000_000


def test_an_earlier_alarm_survives_a_render(tokenizer):
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        render(tokenizer, CHATML)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 0.3
        time.sleep(0.5)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_invalid_jinja_is_a_clear_error(tokenizer):
    with pytest.raises(TemplateError, match=r"not valid Jinja \(line 1"):
        render(tokenizer, "{% for m in messages %}")


def test_the_budget_costs_little(tokenizer):
    tokenizer.chat_template = CHATML
    n = 300
    started = time.perf_counter()
    for _ in range(n):
        render_chat(tokenizer, MESSAGES)
    ours = (time.perf_counter() - started) / n
    started = time.perf_counter()
    for _ in range(n):
        tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    theirs = (time.perf_counter() - started) / n
    assert ours < 3 * theirs + 1e-4, (ours, theirs)
