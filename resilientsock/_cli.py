"""The command line: run a script resiliently, ``explain`` an error, ``demo``, ``relay``.

    python -m resilientsock [OPTIONS] script.py [ARGS...]
    python -m resilientsock [OPTIONS] -m package.module [ARGS...]
    python -m resilientsock [OPTIONS] -c CODE [ARGS...]
    python -m resilientsock [OPTIONS] - [ARGS...]          (the script from stdin)
    python -m resilientsock [OPTIONS] --show-policy
    python -m resilientsock --version
    python -m resilientsock explain ERROR [--json]
    python -m resilientsock demo [--seconds N] [--seed S] [--faults LIST]
    python -m resilientsock relay --listen HOST:PORT --upstream HOST:PORT [OPTIONS]

Rules of this module (docs/design.md §2, §7):

1. The runner patches *before* importing runpy or the script; ``sys.argv`` and ``sys.path[0]``
   are what the script would see under plain ``python`` (``-c`` and ``-`` included); its exit
   code and ``SystemExit`` pass through unchanged.
2. Options are ours only up to the script name (or ``-m MODULE``, ``-c CODE``, ``-``, or
   ``--``); everything after belongs to the script.
3. Every policy field is an option and a ``RESILIENTSOCK_*`` variable; options win.
   ``--show-policy`` says, per field, which of the three a value came from.
4. Bad input is a one-line message and exit status 2, never a traceback.
5. When the script dies of an uncaught exception, every ``resilientsock:`` note found anywhere
   in its chain (causes, contexts, exception groups, exceptions kept in ``args``, ``reason``
   or attributes, as requests, urllib3 and PyMySQL wrap them) is printed after the
   traceback, one line each: the note that explains a give-up is never buried. The same for
   a thread that dies of one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from ._policy import FIELDS, RetryPolicy, _bool, apply_texts, env_texts

__all__ = ["main", "build_policy", "policy_sources", "parse_session", "resilientsock_notes"]

# Policy fields the runner spells its own way: --session takes HOST:PORT[,...] (the targets
# that become sessions, handed to patch(session=...)), not RetryPolicy.session's per-socket bool.
_RUNNER_OWN = frozenset({"session"})
_POLICY_OPTIONS = [name for name in FIELDS if name not in _RUNNER_OWN]
_NON_POLICY_VALUE_OPTIONS = {"--log-level", "--session"}
_VALUE_OPTIONS = {"--" + name.replace("_", "-") for name in _POLICY_OPTIONS}
_VALUE_OPTIONS |= _NON_POLICY_VALUE_OPTIONS
_FLAG_OPTIONS = {"--stats", "--show-policy", "--version", "-h", "--help"}
_NOTE_PREFIX = "resilientsock:"


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
            "  python -m resilientsock [OPTIONS] -c CODE [ARGS...]\n"
            "  python -m resilientsock [OPTIONS] - [ARGS...]    the script from stdin\n"
            "  python -m resilientsock [OPTIONS] --show-policy  the effective policy, and "
            "where each value came from\n"
            "  python -m resilientsock explain ERROR [--json]   what an error means, "
            "whether it is retried\n"
            "  python -m resilientsock demo [--seconds N] [--seed S] [--faults LIST]\n"
            "  python -m resilientsock relay --listen HOST:PORT --upstream HOST:PORT ...\n"
            "                                                   the session relay (see "
            "relay --help)"
        ),
        epilog=(
            "Every option can also be set with an environment variable named after it:\n"
            "--deadline 30 is RESILIENTSOCK_DEADLINE=30; options win over the environment.\n"
            "Options end at the script name, at -m MODULE, -c CODE, '-' or '--'."
        ),
        usage=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="store_true", default=False,
                        help="print the version and exit")
    for name in _POLICY_OPTIONS:
        spec = FIELDS[name]
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, metavar=spec.metavar, default=None,
                            help=f"{spec.help} [env RESILIENTSOCK_{name.upper()}]")
    parser.add_argument("--session", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                        help="connections to these servers become sessions through a relay "
                             "(exactly-once; docs/design.md §11) [env RESILIENTSOCK_SESSION]")
    parser.add_argument("--log-level", default=None, metavar="LEVEL",
                        help="log level of the 'resilientsock' logger: INFO shows failed "
                             "attempts and surfaced errors, DEBUG every drop, reconnect and "
                             "replay (default WARNING) [env RESILIENTSOCK_LOG_LEVEL]")
    parser.add_argument("--stats", action="store_true", default=None,
                        help="print a summary of reconnects and replays on stderr at exit "
                             "[env RESILIENTSOCK_STATS=1]")
    parser.add_argument("--show-policy", action="store_true", default=False,
                        help="print the effective policy and where each value came from "
                             "(default, environment, option), then exit without running "
                             "anything")
    return parser


def _fail(message: str) -> NoReturn:
    print(f"resilientsock: error: {message}", file=sys.stderr)
    raise SystemExit(2)


@dataclass(frozen=True)
class _Target:
    """What to run: ``kind`` is "script" (a path), "module", "code" (-c) or "stdin" (-)."""

    kind: str
    value: str
    args: list[str]


def _split_argv(argv: list[str]) -> tuple[list[str], _Target | None]:
    """(our options, what to run or None)."""
    ours: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest = argv[i + 1:]
            if not rest:
                _fail("'--' must be followed by a script")
            return ours, _Target("script", rest[0], rest[1:])
        if token == "-":
            return ours, _Target("stdin", "-", argv[i + 1:])
        for flag, kind in (("-m", "module"), ("-c", "code")):
            if token == flag:
                if i + 1 >= len(argv):
                    _fail(f"{flag} needs {'a module name' if kind == 'module' else 'code'}")
                return ours, _Target(kind, argv[i + 1], argv[i + 2:])
            if token.startswith(flag) and len(token) > 2 and not token.startswith("--"):
                return ours, _Target(kind, token[2:], argv[i + 1:])
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
        return ours, _Target("script", token, argv[i + 1:])
    return ours, None


def build_policy(options: argparse.Namespace, environ: Mapping[str, str]) -> RetryPolicy:
    """Environment over defaults, options over the environment, validated together (an option
    may make a variable's value valid: ``RESILIENTSOCK_DEADLINE=none --max-attempts 3``).
    ValueError names the culprit: the option (``--deadline '-3': ...``) or the variable."""
    texts = env_texts(environ)
    for name in _POLICY_OPTIONS:
        text = getattr(options, name, None)
        if text is not None:
            texts[name] = (f"--{name.replace('_', '-')} {text!r}", text)
    return apply_texts(RetryPolicy(), texts)


def policy_sources(options: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """Where each policy field's value comes from: ``"option --x"``, ``"environment
    RESILIENTSOCK_X"`` or ``"default"`` (the same precedence as ``build_policy``)."""
    sources = {}
    for name in _POLICY_OPTIONS:
        var = "RESILIENTSOCK_" + name.upper()
        if getattr(options, name, None) is not None:
            sources[name] = "option --" + name.replace("_", "-")
        elif environ.get(var, "").strip():  # an empty variable is unset (env_texts)
            sources[name] = "environment " + var
        else:
            sources[name] = "default"
    return sources


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)$")


def parse_session(text: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]`` (IPv6 as ``[::1]:9000``) as a list of (host, port).

    ValueError names the part that is wrong. The runner hands the targets to
    ``patch(session=[...])`` as ``"HOST:PORT"`` strings (``"[::1]:9000"`` for IPv6), as
    docs/design.md §11 spells them."""
    servers: list[tuple[str, int]] = []
    for part in text.split(","):
        part = part.strip()
        match = _HOST_PORT.match(part)
        if not match:
            raise ValueError(f"{part!r} is not HOST:PORT (IPv6 as [::1]:9000)")
        port = int(match.group("port"))
        if not 0 < port < 65536:
            raise ValueError(f"{part!r}: port {port} is out of range")
        servers.append((match.group("v6") or match.group("host"), port))
    return servers


def _show_policy(policy: RetryPolicy, sources: dict[str, str], session: str | None,
                 session_source: str) -> None:
    rows = [(name, repr(getattr(policy, name)), sources[name]) for name in _POLICY_OPTIONS]
    rows.append(("session", session or "none", session_source))
    width = max(len(name) for name, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    print("resilientsock: effective policy")
    for name, value, source in rows:
        print(f"  {name:<{width}}  {value:<{value_width}}  {source}")


def _run(argv: list[str]) -> None:
    ours, target = _split_argv(argv)
    parser = _runner_parser()
    options = parser.parse_args(ours)
    if options.version:
        from ._version import __version__

        print(f"resilientsock {__version__}")
        return
    if target is None and not options.show_policy:
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    try:
        policy = build_policy(options, os.environ)
    except ValueError as exc:
        _fail(str(exc))
    session_text = options.session
    session_source = "option --session"
    if session_text is None:
        session_text = os.environ.get("RESILIENTSOCK_SESSION", "").strip() or None
        session_source = "environment RESILIENTSOCK_SESSION" if session_text else "default"
    session: list[str] | None = None
    if session_text:
        try:
            from .session.targets import format_address

            session = [format_address(host, port) for host, port in parse_session(session_text)]
        except ValueError as exc:
            where = ("--session " if options.session is not None
                     else "RESILIENTSOCK_SESSION=")
            _fail(f"{where}{session_text!r}: {exc}")
    if options.show_policy:
        _show_policy(policy, policy_sources(options, os.environ),
                     ",".join(session) if session else None, session_source)
        return
    assert target is not None
    level_name = options.log_level or os.environ.get("RESILIENTSOCK_LOG_LEVEL", "").strip()
    if level_name:
        level = logging.getLevelName(level_name.upper())
        if not isinstance(level, int):
            where = "--log-level " if options.log_level else "RESILIENTSOCK_LOG_LEVEL="
            _fail(f"{where}{level_name!r}: not a logging level (DEBUG, INFO, WARNING...)")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        logger = logging.getLogger("resilientsock")
        logger.addHandler(handler)
        logger.setLevel(level)
    elif not logging.getLogger().handlers:
        # The library logger has a NullHandler; the runner is an application and shows our
        # warnings (rate-limited per target, _events) unless the script configures logging.
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler.addFilter(lambda record: not logging.getLogger().handlers)
        logging.getLogger("resilientsock").addHandler(handler)
    want_stats = options.stats
    if not want_stats:
        try:
            want_stats = _bool(os.environ.get("RESILIENTSOCK_STATS", ""))
        except ValueError as exc:
            _fail(f"RESILIENTSOCK_STATS={os.environ['RESILIENTSOCK_STATS']!r}: {exc}")
    stats_file = os.environ.get("RESILIENTSOCK_STATS_FILE") or None
    if stats_file is not None:
        folder = os.path.dirname(os.path.abspath(stats_file))
        if os.path.isdir(stats_file) or not os.path.isdir(folder):
            _fail(f"RESILIENTSOCK_STATS_FILE={stats_file!r}: "
                  + ("a directory" if os.path.isdir(stats_file) else "no such directory"))
        if not os.access(folder, os.W_OK):
            _fail(f"RESILIENTSOCK_STATS_FILE={stats_file!r}: the directory is not writable")

    if target.kind == "script" and not os.path.exists(target.value):
        _fail(f"can't open file {target.value!r}: no such file")
    code = None
    if target.kind == "stdin":
        code = sys.stdin.read()
    elif target.kind == "code":
        code = target.value

    _install_note_printer()

    from . import _events

    _events.set_runner(True)

    # Rule 1: patch first, then runpy, then the script.
    from ._patching import patch

    if session is not None:
        patch(policy, session=session)
    else:
        patch(policy)

    import atexit

    from . import _stats

    if want_stats:
        atexit.register(lambda: print(_stats.summary(), file=sys.stderr))
    if stats_file:
        # Where it was checked: a script that changes directory does not move it.
        atexit.register(_dump_stats, os.path.abspath(stats_file))

    if code is not None:
        _run_code(code, "<string>" if target.kind == "code" else "<stdin>", target)
        return

    import runpy

    if target.kind == "module":
        sys.argv = [target.value, *target.args]
        sys.path.insert(0, os.getcwd())
        missing = _module_missing(target.value)
        if missing is not None:
            # As python says it: one line and status 1, not a traceback out of runpy.
            print(f"resilientsock: {missing}", file=sys.stderr)
            raise SystemExit(1)
        runpy.run_module(target.value, run_name="__main__", alter_sys=True)
    else:
        path = os.path.abspath(target.value)
        sys.argv = [target.value, *target.args]
        # As python does: the directory of the script with symlinks resolved (review).
        sys.path[0] = os.path.dirname(os.path.realpath(path))
        import pkgutil

        importer = pkgutil.get_importer(path)
        if importer is None:
            _run_file(target.value)
        else:
            # A directory or a zip file with a __main__.py: runpy's job (it sets argv[0]
            # to the path it is given, so give it the one the caller gave). Without one, as
            # python says it: one line and status 1, not a traceback out of runpy.
            try:
                found = importer.find_spec("__main__") is not None
            except (ImportError, AttributeError, ValueError):
                found = True  # let runpy say what is wrong
            if not found:
                print(f"resilientsock: can't find '__main__' module in {path!r}",
                      file=sys.stderr)
                raise SystemExit(1)
            runpy.run_path(target.value, run_name="__main__")


def _module_missing(name: str) -> str | None:
    """Why ``python -m name`` could not start, in python's words; None when it can. Only the
    lookup: an ImportError raised by the module's own code is its own error (traceback)."""
    import importlib.util

    def find(what: str) -> Any:
        return importlib.util.find_spec(what)

    try:
        spec = find(name)
        if spec is None:
            return f"No module named {name}"
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            if find(f"{name}.__main__") is None:
                return (f"No module named {name}.__main__; {name!r} is a package and "
                        "cannot be directly executed")
    except (ImportError, ValueError, AttributeError) as exc:
        return (f"Error while finding module specification for {name!r} "
                f"({type(exc).__name__}: {exc})")
    return None


def _dump_stats(path: str) -> None:
    """``RESILIENTSOCK_STATS_FILE`` at exit: a failure is one line, never a traceback, and
    the script's exit status stays."""
    from . import _stats

    try:
        _stats.dump_json(path)
    except OSError as exc:
        print(f"resilientsock: RESILIENTSOCK_STATS_FILE={path!r}: not written: {exc}",
              file=sys.stderr)


def _run_file(given: str) -> None:
    """A script file as ``python given`` runs it: ``sys.argv[0]`` stays the path as given
    (``runpy.run_path`` would make it the path it was handed), ``__file__`` and the code's
    file name are that path joined to the current directory, as python's are, and the
    runner's own ``__future__`` imports do not leak into the script."""
    import builtins
    import io
    import pkgutil
    import types
    from importlib.machinery import SourceFileLoader, SourcelessFileLoader

    filename = os.path.join(os.getcwd(), given)
    with io.open_code(filename) as f:
        code = pkgutil.read_code(f)  # a compiled .pyc, as runpy and python accept
    loader: Any = SourcelessFileLoader("__main__", filename)
    if code is None:
        with io.open_code(filename) as f:
            code = compile(f.read(), filename, "exec", dont_inherit=True)
        loader = SourceFileLoader("__main__", filename)
    main_module = types.ModuleType("__main__")
    main_module.__dict__.update(__file__=filename, __cached__=None, __loader__=loader,
                                __builtins__=builtins)
    sys.modules["__main__"] = main_module
    exec(code, main_module.__dict__)


def _run_code(code: str, filename: str, target: _Target) -> None:
    """``-c CODE`` / ``-`` as python runs them: ``sys.argv[0]`` is "-c" or "-",
    ``sys.path[0]`` is "" (the current directory), a fresh ``__main__`` module."""
    import builtins
    import types

    sys.argv = ["-c" if target.kind == "code" else "-", *target.args]
    sys.path[0] = ""
    main_module = types.ModuleType("__main__")
    main_module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main_module
    exec(compile(code, filename, "exec", dont_inherit=True), main_module.__dict__)


# -- notes in sight (rule 5) ---------------------------------------------------------------------

_MAX_WALK = 1000  # exceptions looked at per chain: a bound against pathological graphs


def _linked(exc: BaseException) -> Iterator[BaseException]:
    """Exceptions reachable from ``exc`` in one step."""
    candidates: list[object] = [exc.__cause__, exc.__context__]
    candidates.extend(getattr(exc, "exceptions", None) or ())  # ExceptionGroup
    candidates.extend(exc.args)
    candidates.append(getattr(exc, "reason", None))  # urllib3 MaxRetryError, URLError
    try:
        candidates.extend(vars(exc).values())
    except TypeError:
        pass
    for item in candidates:
        if isinstance(item, BaseException):
            yield item
        elif isinstance(item, list | tuple):
            yield from (x for x in item if isinstance(x, BaseException))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _ours(filename: str) -> bool:
    """A frame of resilientsock itself (its runner included) or of runpy."""
    return (os.path.abspath(filename).startswith(_PACKAGE_DIR) or filename == "<frozen runpy>"
            or os.path.basename(filename) == "runpy.py")


def _gevents(filename: str) -> bool:
    """A frame of gevent (its compiled modules name their sources ``src/gevent/...``)."""
    if filename.startswith("src/gevent/"):
        return True
    gevent = sys.modules.get("gevent")
    where = getattr(gevent, "__file__", None)
    return where is not None and os.path.abspath(filename).startswith(
        os.path.dirname(os.path.abspath(where)) + os.sep)


def _trim(tb: Any) -> Any:
    """The traceback as ``python script.py`` would show it: without the runner's frames
    before the script's, without resilientsock's frames after the application's last, and
    without resilientsock's and gevent's frames between two of the application's (a signal
    handler's ``KeyboardInterrupt`` raised while a socket waited in the hub)."""
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    keep = [not _ours(f.tb_frame.f_code.co_filename) for f in frames]
    if not any(keep):
        return None
    first = keep.index(True)
    last = len(keep) - 1 - keep[::-1].index(True)
    frames[last].tb_next = None
    inner = frames[first:last + 1]
    shown = [f for f in inner if not (_ours(f.tb_frame.f_code.co_filename)
                                      or _gevents(f.tb_frame.f_code.co_filename))]
    if len(shown) == len(inner) or shown[0] is not inner[0]:
        return frames[first]
    import types

    rebuilt = None
    for f in reversed(shown):
        rebuilt = types.TracebackType(rebuilt, f.tb_frame, f.tb_lasti, f.tb_lineno)
    return rebuilt


def _plain_traceback(value: BaseException, tb: Any) -> Any:
    """Trim the traceback of an uncaught exception and of its chain (rule 5: the plain
    traceback plus our note, not 40 lines of ours). A cause or context raised entirely inside
    resilientsock (the give-up's last attempt, already named in the note) is hidden."""
    seen: set[int] = set()
    current: BaseException | None = value
    while current is not None and id(current) not in seen and len(seen) < _MAX_WALK:
        seen.add(id(current))
        if current is not value and current.__traceback__ is not None:
            current.__traceback__ = _trim(current.__traceback__)
        linked = current.__cause__ or (None if current.__suppress_context__
                                        else current.__context__)
        if linked is not None and linked.__traceback__ is not None and all(
                _ours(f.f_code.co_filename) for f, _ in _walk_tb(linked.__traceback__)):
            current.__cause__ = None
            current.__suppress_context__ = True
            linked = None
        current = linked
    trimmed = _trim(tb)
    if trimmed is None:
        return tb
    value.__traceback__ = trimmed  # what the default hook prints (3.11+ reads it there)
    return trimmed


def _walk_tb(tb: Any) -> Any:
    import traceback

    return traceback.walk_tb(tb)


def resilientsock_notes(exc: BaseException) -> list[str]:
    """Every PEP 678 note starting with ``resilientsock:`` found in ``exc``'s chain, in the
    order found (``exc`` first, then breadth-first), each once. Cycle-safe, bounded (at most
    ``_MAX_WALK`` exceptions looked at), and it never raises for an odd exception object."""
    seen: set[int] = set()
    notes: list[str] = []
    queue = [exc]
    while queue and len(seen) < _MAX_WALK:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        for note in getattr(current, "__notes__", None) or ():
            if isinstance(note, str) and note.startswith(_NOTE_PREFIX) and note not in notes:
                notes.append(note)
        try:
            queue.extend(_linked(current))
        except Exception:  # noqa: BLE001 - an odd exception object must not hide the rest
            continue
    return notes


def _install_note_printer() -> None:
    """After the traceback of an uncaught exception, print the resilientsock notes of its
    whole chain (rule 5). Python 3.10 keeps PEP 678 ``__notes__`` but its traceback printer
    ignores them: there the top exception's own notes are printed too, as 3.11+ does."""
    previous = sys.excepthook
    shows_notes = sys.version_info >= (3, 11)

    def print_notes(value: BaseException | None) -> None:
        if value is None:
            return
        try:
            if not shows_notes:
                for note in getattr(value, "__notes__", None) or ():
                    print(note, file=sys.stderr)
            top = set(getattr(value, "__notes__", None) or ())
            for note in resilientsock_notes(value):
                if note not in top:
                    print(note, file=sys.stderr)
        except Exception:  # noqa: BLE001 - the traceback is already out; never mask it
            pass

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        try:
            tb = _plain_traceback(value, tb)
        except Exception:  # noqa: BLE001 - never mask the application's error
            pass
        previous(kind, value, tb)
        print_notes(value)

    sys.excepthook = hook

    # A thread that dies of an uncaught exception: the same, after its traceback.
    import threading

    previous_thread_hook = threading.excepthook

    def thread_hook(args: Any) -> None:
        previous_thread_hook(args)
        print_notes(args.exc_value)

    threading.excepthook = thread_hook


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
        # A bare word must look like a class (CapWords): "error" or "timeout" alone is an
        # English word, not socket.error; qualified names ("socket.timeout") may be lowercase.
        # A qualified name must name a module whose classes we look up: requests'
        # ConnectionError is not the builtin one.
        qualifier, _, name = word.rpartition(".")
        if qualifier and qualifier not in _CLASS_MODULES:
            continue
        if not qualifier and not name[:1].isupper():
            continue
        entry = _explain_class(name)
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

    # ssl raises this reason as SSLCertVerificationError (a handshake error: nothing sent).
    kind = ssl.SSLCertVerificationError if reason == "CERTIFICATE_VERIFY_FAILED" else ssl.SSLError
    exc = kind(1, text)
    exc.reason = reason
    info = classify(exc)
    assert info is not None  # every SSLError that is not want-read/write is classified
    return _entry(reason, info)


_CLASS_MODULES = ("ssl", "builtins", "socket", "http.client")


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
    if argv and argv[0] == "relay":
        # Imported only here: the relay's module is not needed by anything else.
        from .session.cli import main as relay_main

        raise SystemExit(relay_main(argv[1:]))
    if not argv:
        _runner_parser().print_help(sys.stderr)
        raise SystemExit(2)
    _run(argv)
