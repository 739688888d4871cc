"""The plugin manager: hooks called through pluggy (firstresult, wrappers), a failing plugin named and
set aside while the others keep working, and SELFSPEC_PLUGINS choosing which plugins load."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from selfspec_core.api import Domain, PromptTemplate, default_template, hookimpl
from selfspec_core.errors import SelfspecError, one_line
from selfspec_core.plugins import manager as plugins


class Answering:
    """Answers prompt_template for stage "train" with its own template, counting its calls."""

    def __init__(self, header: str):
        self.template = replace(default_template("train"), header=header)
        self.calls = 0

    @hookimpl
    def prompt_template(self, stage):
        self.calls += 1
        return self.template if stage == "train" else None


def test_a_firstresult_hook_stops_at_the_first_answer_of_the_last_registered(plugin):
    first, second = Answering("first"), Answering("second")
    plugin(first, "answers-first")
    plugin(second, "answers-second")
    hook = plugins.get_plugin_manager().hook.prompt_template
    assert hook(domain="x", stage="train") is second.template  # pluggy's own call: one answer, not a list
    assert (first.calls, second.calls) == (0, 1)  # the earlier plugin was never asked
    assert plugins.first_answer("prompt_template", PromptTemplate, domain="x", stage="train") is second.template
    assert first.calls == 0
    # A stage the last plugin leaves alone falls through to the earlier ones, then to the core's default.
    assert plugins.first_answer("prompt_template", PromptTemplate, domain="x", stage="judge") == default_template(
        "judge"
    )
    assert (first.calls, second.calls) == (1, 3)


class Wrapping:
    """A new-style wrapper (pluggy's ``wrapper=True``): runs around the implementations, sees their
    result and returns what the call gives back."""

    def __init__(self):
        self.seen = []

    @hookimpl(wrapper=True)
    def prompt_template(self, stage):
        result = yield
        self.seen.append((stage, result.header if result else None))
        return replace(result, header=f"wrapped {result.header}") if result else result

    @hookimpl(wrapper=True)
    def blacklist_words(self, domain):
        answers = yield
        return [[word for word in words if word != "image"] for words in answers]


def test_a_wrapper_sees_and_may_change_the_result_of_every_call(plugin):
    wrapper = Wrapping()
    plugin(Answering("own"), "answers")
    plugin(wrapper, "wrapper")
    template = plugins.first_answer("prompt_template", PromptTemplate, domain="x", stage="train")
    assert template.header == "wrapped own" and wrapper.seen == [("train", "own")]
    # Each plugin's answer is asked through a pluggy caller of its own, which keeps the wrappers: the
    # core's words come back without the one the wrapper drops. A plugin that only wraps gives no answer.
    answers = dict(plugins.results("blacklist_words", (list, tuple, set), str, domain="x"))
    assert list(answers) == ["core"] and "image" not in answers["core"] and "video" in answers["core"]


class Raising:
    @hookimpl
    def blacklist_words(self, domain):
        raise KeyError("lexicon")


class WrongType:
    @hookimpl
    def blacklist_words(self, domain):
        return "chart"


def test_pluggys_own_call_names_the_plugin_that_raised(plugin):
    plugin(Raising(), "raising")
    with pytest.raises(plugins.PluginBroken) as raised:
        plugins.get_plugin_manager().hook.blacklist_words(domain="x")
    assert raised.value.plugin == "raising"
    assert str(raised.value) == (
        "plugin 'raising' is broken: hook blacklist_words: raised KeyError: 'lexicon'; selfspec check-plugin raising"
    )


def test_an_interrupt_inside_a_hook_stays_an_interrupt(plugin):
    class Interrupted:
        @hookimpl
        def blacklist_words(self, domain):
            raise KeyboardInterrupt

    plugin(Interrupted(), "interrupted")
    with pytest.raises(KeyboardInterrupt):
        plugins.results("blacklist_words", list, domain="x")
    assert "interrupted" not in plugins.broken_plugins()


def test_a_broken_plugin_is_set_aside_in_one_line_and_the_others_answer(plugin, capsys):
    plugin(Raising(), "raising")
    plugin(WrongType(), "wrongtype")
    for _ in range(2):
        answers = plugins.results("blacklist_words", (list, tuple, set), str, domain="x")
        assert [name for name, _ in answers] == ["core"]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "warning: plugin 'wrongtype' is broken: hook blacklist_words: returned str, expected list or tuple or set; "
        "selfspec check-plugin wrongtype",
        "warning: plugin 'raising' is broken: hook blacklist_words: raised KeyError: 'lexicon'; "
        "selfspec check-plugin raising",
    ]  # once each, however often the hook is called
    assert set(plugins.broken_plugins()) == {"raising", "wrongtype"}
    # pluggy's firstresult calls leave them out too
    assert plugins.first_answer("prompt_template", PromptTemplate, domain="x", stage="train") == default_template(
        "train"
    )


class OwnDomain(Raising):
    @hookimpl
    def register_domains(self, register):
        register(Domain(name="needed", description="a domain a command works on"))


def test_the_plugin_of_the_domain_a_command_works_on_stops_it(plugin):
    plugin(OwnDomain(), "needed-plugin")
    assert plugins.get_domain("needed").plugin == "needed-plugin"
    with pytest.raises(SelfspecError, match="plugin 'needed-plugin' is broken: hook blacklist_words: raised KeyError"):
        plugins.results("blacklist_words", list, domain="needed")


def test_a_plugin_claiming_a_taken_domain_is_set_aside(plugin, capsys):
    class Impostor:
        @hookimpl
        def register_domains(self, register):
            register(Domain(name="finance", description="not the real one"))

    plugin(Impostor(), "impostor")
    assert plugins.domains()["finance"].plugin == "finance"
    assert "plugin 'impostor' is broken: hook register_domains: registers domain 'finance', which plugin " in (
        capsys.readouterr().err
    )


def test_the_domains_are_worked_out_once_until_the_plugins_in_use_change(plugin, capsys):
    """collect_tasks asks for the domains (and each plugin's task files) once per domain: each plugin's
    register_domains runs once a command, again only after a plugin is registered or set aside."""
    from selfspec_core.stages.evaluate import collect_tasks

    class Counting:
        calls = 0

        @hookimpl
        def register_domains(self, register):
            Counting.calls += 1
            register(Domain(name="counted", description="a domain that counts its registrations"))

    plugin(Counting(), "counting")
    collect_tasks("counted", cross_domain=True)
    assert plugins.domains()["counted"].plugin == "counting" and Counting.calls == 1
    plugins.domains()["counted"] = None  # a caller's change stays the caller's
    assert plugins.domains()["counted"].plugin == "counting" and Counting.calls == 1
    plugin(Raising(), "raising")  # another plugin in use: worked out again
    assert "counted" in plugins.domains() and Counting.calls == 2
    plugins.set_aside(plugins.PluginBroken("counting", "gone"))
    assert "counted" not in plugins.domains() and "plugin 'counting' is broken: gone" in capsys.readouterr().err


def test_a_plugins_several_line_failure_is_one_line():
    broken = plugins.PluginBroken("law", "Traceback:\n  first\n\n  second\n")
    assert broken.detail == "Traceback: first second"
    assert one_line(ValueError("")) == "ValueError" and one_line("a\nb", limit=2) == "a "


def selfspec(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "selfspec_core", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


def test_pluggys_tracing_shows_each_hook_call():
    traced = selfspec("domains", "--plugins", "finance", env={"SELFSPEC_TRACE_HOOKS": "1"})
    assert traced.returncode == 0, traced.stderr
    assert "  register_domains [hook]\n" in traced.stderr
    assert "  retrieval_corpus [hook]\n      domain: finance\n" in traced.stderr
    assert "finish retrieval_corpus --> [" in traced.stderr  # the first answer: finance's corpus paths


def test_selfspec_plugins_env_and_option_load_only_the_named_plugins():
    only = selfspec("plugins", "--json", env={"SELFSPEC_PLUGINS": "finance"})
    assert only.returncode == 0, only.stderr
    assert [p["name"] for p in json.loads(only.stdout)] == ["finance"]
    none = selfspec("domains", env={"SELFSPEC_PLUGINS": ""})
    assert none.returncode == 0 and "no domains installed" in none.stdout
    misspelled = selfspec("domains", env={"SELFSPEC_PLUGINS": "finance,biomd"})
    assert misspelled.returncode == 0
    assert misspelled.stdout.startswith("finance  (plugin finance)") and "biomed" not in misspelled.stdout
    assert misspelled.stderr.strip() == (
        "warning: SELFSPEC_PLUGINS names 'biomd', which is not installed (did you mean 'biomed'?); "
        "installed plugins: biomed, finance"
    )
