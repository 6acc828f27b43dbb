"""The command line: run a script resiliently, ``explain`` an error, ``demo``.

    python -m resilientsock [OPTIONS] script.py [ARGS...]
    python -m resilientsock [OPTIONS] -m package.module [ARGS...]
    python -m resilientsock explain ERROR [--json]
    python -m resilientsock demo [--seconds N] [--seed S] [--faults LIST]

Rules of this module (DESIGN §2, §7):

1. The runner patches *before* importing runpy or the script; ``sys.argv`` and ``sys.path[0]``
   are what the script would see under plain ``python``; its exit code and ``SystemExit``
   pass through unchanged.
2. Options are ours only up to the script name (or ``-m MODULE``, or ``--``); everything
   after belongs to the script.
3. Every policy field is an option and a ``RESILIENTSOCK_*`` variable; options win.
4. Bad input is a one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from ._policy import FIELDS, RetryPolicy

__all__ = ["main"]

_VALUE_OPTIONS = {"--" + name.replace("_", "-") for name in FIELDS} | {"--log-level"}
_FLAG_OPTIONS = {"--stats", "-h", "--help"}


def _runner_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resilientsock",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run an unchanged Python script with resilient sockets: a dropped connection is\n"
            "reconnected (new DNS lookup, new TLS handshake), unanswered writes are re-sent,\n"
            "and the call carries on. When recovery fails, the script gets the original\n"
            "exception type with a note saying what was tried.\n\n"
            "usage:\n"
            "  python -m resilientsock [OPTIONS] script.py [ARGS...]\n"
            "  python -m resilientsock [OPTIONS] -m package.module [ARGS...]\n"
            "  python -m resilientsock explain ERROR [--json]   what an error means, "
            "whether it is retried\n"
            "  python -m resilientsock demo [--seconds N] [--seed S] [--faults LIST]"
        ),
        epilog=(
            "Every option can also be set with an environment variable named after it:\n"
            "--deadline 30 is RESILIENTSOCK_DEADLINE=30; options win over the environment.\n"
            "Options end at the script name, at -m MODULE, or at '--'."
        ),
        usage=argparse.SUPPRESS,
    )
    for name, spec in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, metavar=spec.metavar, default=None,
                            help=f"{spec.help} [env RESILIENTSOCK_{name.upper()}]")
    parser.add_argument("--log-level", default=None, metavar="LEVEL",
                        help="log level of the 'resilientsock' logger, e.g. INFO to see every "
                             "reconnect (default WARNING) [env RESILIENTSOCK_LOG_LEVEL]")
    parser.add_argument("--stats", action="store_true", default=None,
                        help="print a summary of reconnects and replays on stderr at exit "
                             "[env RESILIENTSOCK_STATS=1]")
    return parser


def _fail(message: str) -> NoReturn:
    print(f"resilientsock: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _split_argv(argv: list[str]) -> tuple[list[str], str | None, str | None, list[str]]:
    """(our options, script, module, the script's args)."""
    ours: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest = argv[i + 1:]
            if not rest:
                _fail("'--' must be followed by a script")
            return ours, rest[0], None, rest[1:]
        if token == "-m":
            if i + 1 >= len(argv):
                _fail("-m needs a module name")
            return ours, None, argv[i + 1], argv[i + 2:]
        if token.startswith("-m") and len(token) > 2 and not token.startswith("--"):
            return ours, None, token[2:], argv[i + 1:]
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            if name in _VALUE_OPTIONS:
                ours.append(token)
                if "=" not in token:
                    if i + 1 >= len(argv):
                        _fail(f"{name} needs a value")
                    ours.append(argv[i + 1])
                    i += 1
            elif name in _FLAG_OPTIONS:
                ours.append(token)
            else:
                _fail(f"unknown option {token!r} (see --help)")
            i += 1
            continue
        return ours, token, None, argv[i + 1:]
    return ours, None, None, []


def build_policy(options: argparse.Namespace, environ: Mapping[str, str]) -> RetryPolicy:
    """Environment over defaults, options over the environment. ValueError names the culprit."""
    policy = RetryPolicy.from_env(environ)
    changes: dict[str, Any] = {}
    for name, spec in FIELDS.items():
        text = getattr(options, name)
        if text is None:
            continue
        try:
            changes[name] = spec.parse(text)
        except ValueError as exc:
            raise ValueError(f"--{name.replace('_', '-')} {text!r}: {exc}") from None
    try:
        return policy.replace(**changes)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def _run(argv: list[str]) -> None:
    ours, script, module, script_args = _split_argv(argv)
    parser = _runner_parser()
    options = parser.parse_args(ours)
    if script is None and module is None:
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    try:
        policy = build_policy(options, os.environ)
    except ValueError as exc:
        _fail(str(exc))
    level_name = options.log_level or os.environ.get("RESILIENTSOCK_LOG_LEVEL")
    if level_name:
        level = logging.getLevelName(level_name.upper())
        if not isinstance(level, int):
            _fail(f"--log-level {level_name!r}: not a logging level (DEBUG, INFO, WARNING...)")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        logger = logging.getLogger("resilientsock")
        logger.addHandler(handler)
        logger.setLevel(level)
    want_stats = options.stats or os.environ.get("RESILIENTSOCK_STATS", "") not in ("", "0")
    stats_file = os.environ.get("RESILIENTSOCK_STATS_FILE")

    if script is not None and not os.path.exists(script):
        _fail(f"can't open file {script!r}: no such file")

    if sys.version_info < (3, 11):
        _print_notes_on_crash()

    # Rule 1: patch first, then runpy, then the script.
    from ._patching import patch

    patch(policy)

    import atexit

    from . import _stats

    if want_stats:
        atexit.register(lambda: print(_stats.summary(), file=sys.stderr))
    if stats_file:
        atexit.register(_stats.dump_json, stats_file)

    import runpy

    if module is not None:
        sys.argv = [module, *script_args]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        assert script is not None
        path = os.path.abspath(script)
        sys.argv = [script, *script_args]
        sys.path[0] = os.path.dirname(path)
        runpy.run_path(path, run_name="__main__")


def _print_notes_on_crash() -> None:
    """Python 3.10 keeps PEP 678 ``__notes__`` but its traceback printer ignores them, so a
    script that dies under the runner would hide what resilientsock tried. Print them after the
    traceback, as 3.11+ does."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        for note in getattr(value, "__notes__", ()):
            print(note, file=sys.stderr)

    sys.excepthook = hook


# -- explain ------------------------------------------------------------------------------------

def explain(text: str) -> list[dict[str, Any]]:
    """Interpret ``text`` (a number, a symbol, a log fragment or an exception class name).

    Returns one entry per meaning. Raises ValueError when nothing fits.
    """
    from . import _facts

    text = text.strip()
    if not text:
        raise ValueError("nothing to explain")
    if re.fullmatch(r"-?\d+", text):
        return _explain_number(int(text))
    if re.fullmatch(r"(WSA)?E[A-Z0-9_]+", text) and (
        text in _facts.LINUX or text in _facts.MACOS or text in _facts.EAI_LINUX
        or text.startswith("WSA") or text in _facts.WINDOWS_CRT
    ):
        return [_explain_symbol(text.removeprefix("WSA") if text.startswith("WSAE") else text)]
    ssl_reason = re.search(r"\[SSL: ([A-Z0-9_]+)\]", text)
    if ssl_reason:
        return [_explain_ssl_reason(ssl_reason.group(1), text)]
    errno_match = re.search(r"\[(?:Errno|WinError) (-?\d+)\]\s*(.*)", text)
    if errno_match:
        number, message = int(errno_match.group(1)), errno_match.group(2).strip()
        entries = _explain_number(number)
        by_message = [e for e in entries if _message_matches(e["symbol"], message)]
        return by_message or entries
    for word in re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", text):
        entry = _explain_class(word.rsplit(".", 1)[-1])
        if entry is not None:
            return [entry]
    for symbol, message in _facts.MESSAGES.items():
        if message.lower() in text.lower():
            return [_explain_symbol(symbol)]
    raise ValueError(f"cannot tell what {text!r} is: give an errno number (54), a symbol "
                     "(ECONNRESET, EAI_AGAIN), a log line ('[Errno 104] Connection reset by "
                     "peer') or an exception class (SSLEOFError)")


def _message_matches(symbol: str, message: str) -> bool:
    from . import _facts

    if not message:
        return False
    known = _facts.MESSAGES.get(symbol)
    if known and known.lower() in message.lower():
        return True
    try:
        import errno as _errno

        value = getattr(_errno, symbol, None)
        return value is not None and os.strerror(value).lower() in message.lower()
    except ValueError:
        return False


def _explain_number(number: int) -> list[dict[str, Any]]:
    from . import _facts

    per_platform = _facts.symbols_for_number(number)
    symbols: dict[str, list[str]] = {}
    for platform, names in per_platform.items():
        for name in names:
            clean = name.removeprefix("WSA") if name.startswith("WSAE") else name
            symbols.setdefault(clean, []).append(platform)
    if not symbols:
        raise ValueError(f"{number} is not an errno or resolver code on Linux, macOS/BSD or "
                         "Windows that resilientsock knows")
    out = []
    for symbol, platforms in symbols.items():
        entry = _explain_symbol(symbol) if not symbol.startswith("WSA") else _entry(symbol, None)
        entry["number"] = number
        entry["means_this_on"] = platforms
        out.append(entry)
    # Connection errors first: that is usually what the person is looking at.
    out.sort(key=lambda e: e["category"] is None)
    return out


def _entry(symbol: str, info: Any, numbers: dict[str, int | None] | None = None,
           why: str | None = None) -> dict[str, Any]:
    """One meaning of the input: ``info`` is its ErrorInfo, or None for "not a connection
    error" (``why`` then says why, if there is more to say)."""
    from ._errors import REASONS

    if info is None:
        return {"symbol": symbol, "category": None, "retried": False,
                "why": why or "not a connection error: resilientsock passes it through unchanged",
                "maybe_delivered": None, "numbers": numbers or {}}
    return {"symbol": symbol, "category": info.category.name, "retried": info.retryable,
            "why": REASONS[info.category], "maybe_delivered": info.maybe_delivered,
            "numbers": numbers or {}}


def _explain_symbol(symbol: str) -> dict[str, Any]:
    from . import _errors, _facts

    category = _errors._ERRNO_TABLE.get(symbol) or _errors._EAI_TABLE.get(symbol)
    numbers = _facts.platform_numbers(symbol)
    if category is None:
        why = ("never a connection error (flow control, local misuse or resource exhaustion): "
               "passed through unchanged" if symbol in _errors._NEVER_ERRNO else None)
        return _entry(symbol, None, numbers, why)
    return _entry(symbol, _errors._info(category, symbol, None), numbers)


def _explain_ssl_reason(reason: str, text: str) -> dict[str, Any]:
    import ssl

    from ._errors import classify

    exc = ssl.SSLError(1, text)
    exc.reason = reason  # type: ignore[attr-defined]
    info = classify(exc)
    assert info is not None  # every SSLError that is not want-read/write is classified
    return _entry(reason, info)


def _explain_class(name: str) -> dict[str, Any] | None:
    import builtins
    import http.client
    import socket
    import ssl

    from ._errors import classify

    klass = None
    for namespace in (ssl, builtins, socket, http.client):
        candidate = getattr(namespace, name, None)
        if isinstance(candidate, type) and issubclass(candidate, BaseException):
            klass = candidate
            break
    if klass is None:
        return None
    try:
        exc = klass()
    except Exception:  # noqa: BLE001 - classes that need arguments
        return None
    return _entry(name, classify(exc))


def _format(entries: list[dict[str, Any]]) -> str:
    lines = []
    for entry in entries:
        head = entry["symbol"]
        if "number" in entry:
            where = ", ".join({"linux": "Linux", "macos": "macOS/BSD", "windows": "Windows"}[p]
                              for p in entry["means_this_on"])
            head = f"{entry['number']} on {where}: {entry['symbol']}"
        lines.append(head)
        if entry["category"] is None:
            lines.append(f"  category:        none ({entry['why']})")
        else:
            lines.append(f"  category:        {entry['category']}")
            lines.append(f"  retried:         {'yes' if entry['retried'] else 'no'} - "
                         f"{entry['why']}")
            delivered = entry["maybe_delivered"]
            if not delivered:
                said = "nothing written could have reached the peer"
            elif entry["retried"]:
                said = "written data may have reached the peer (it is re-sent: at-least-once)"
            else:
                said = "written data may have reached the peer (not re-sent: the error is shown)"
            lines.append(f"  data delivered:  {said}")
        numbers = entry.get("numbers") or {}
        if numbers:
            shown = ", ".join(
                f"{label} {numbers.get(key) if numbers.get(key) is not None else '-'}"
                for key, label in (("linux", "Linux"), ("macos", "macOS/BSD"),
                                   ("windows", "Windows")))
            lines.append(f"  numbers:         {shown}")
    return "\n".join(lines)


def _explain_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m resilientsock explain",
        description="What an error means: its category, whether resilientsock retries it and "
                    "why, whether written data may have reached the peer, and the symbol's "
                    "numbers on Linux, macOS/BSD and Windows (one number can mean different "
                    "things on each).",
        epilog="examples: explain 54 | explain ECONNRESET | explain EAI_AGAIN | "
               "explain \"[Errno 104] Connection reset by peer\" | explain SSLEOFError")
    parser.add_argument("error", nargs="+", help="a number, symbol, log fragment or class name")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    text = " ".join(args.error)
    try:
        entries = explain(text)
    except ValueError as exc:
        _fail(str(exc))
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        print(_format(entries))


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m resilientsock``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "explain":
        _explain_main(argv[1:])
        return
    if argv and argv[0] == "demo":
        from ._demo import demo_main

        demo_main(argv[1:])
        return
    if not argv:
        _runner_parser().print_help(sys.stderr)
        raise SystemExit(2)
    _run(argv)
