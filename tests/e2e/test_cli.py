"""The strata command on the default model: generate, chat (streamed, from piped input), info."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from strata.entrypoints.cli import build_parser, main


def test_help_explains_every_flag():
    parser = build_parser()
    for command in ("generate", "chat", "info"):
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings} has no help text"


def test_generate_greedy(capsys):
    assert main(["generate", "The capital of France is", "--max-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("The capital of France is")
    assert "Paris" in out.out
    assert "KV cache" in out.err and "blocks" in out.err      # the startup line


def test_chat_streams_replies_from_piped_input(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n\n"))
    assert main(["chat", "--temperature", "0", "--max-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_info_reports_memory_plan(capsys):
    assert main(["info", "--kv-cache-memory", "64MiB"]) == 0
    out = capsys.readouterr().out
    for key in ("LlamaForCausalLM", "134.5M", "float32", "KV cache", "blocks", "max_model_len"):
        assert key in out


def test_bad_model_path_is_a_clean_error(capsys):
    assert main(["info", "--model", "/no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "strata.entrypoints.cli", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "generate" in result.stdout
