"""Platform facts: what an error number means on Linux, macOS/BSD and Windows.

Rules of this module:

1. These tables are *facts about other platforms*, used only by ``explain`` to answer a person
   reading a log from a machine that is not this one. The classifier never uses numbers: it
   looks symbols up on the running platform with ``getattr(errno, name, None)``.
2. Linux numbers are glibc/Linux x86-64 and arm64 (asm-generic); a test checks them against the
   live ``errno`` module when it runs on Linux.
3. macOS numbers are XNU's ``sys/errno.h``. FreeBSD/OpenBSD share 1-65 (every socket error);
   above 65 the BSDs differ, so the column is labelled macOS for those.
4. Windows sockets report WinSock codes (``WSAECONNRESET`` = 10054), and CPython's ``errno`` on
   Windows maps the socket symbols to those codes. The CRT's own errno values (100-140 for the
   POSIX supplement) are listed too because they appear in logs of non-socket calls.
5. ``getaddrinfo`` errors (``EAI_*``) are their own number space, negative on glibc.
"""

from __future__ import annotations

LINUX: dict[str, int] = {
    "EPERM": 1, "ENOENT": 2, "ESRCH": 3, "EINTR": 4, "EIO": 5, "ENXIO": 6, "E2BIG": 7,
    "ENOEXEC": 8, "EBADF": 9, "ECHILD": 10, "EAGAIN": 11, "ENOMEM": 12, "EACCES": 13,
    "EFAULT": 14, "ENOTBLK": 15, "EBUSY": 16, "EEXIST": 17, "EXDEV": 18, "ENODEV": 19,
    "ENOTDIR": 20, "EISDIR": 21, "EINVAL": 22, "ENFILE": 23, "EMFILE": 24, "ENOTTY": 25,
    "ETXTBSY": 26, "EFBIG": 27, "ENOSPC": 28, "ESPIPE": 29, "EROFS": 30, "EMLINK": 31,
    "EPIPE": 32, "EDOM": 33, "ERANGE": 34, "EDEADLK": 35, "ENAMETOOLONG": 36, "ENOLCK": 37,
    "ENOSYS": 38, "ENOTEMPTY": 39, "ELOOP": 40, "ENOMSG": 42, "EIDRM": 43, "ECHRNG": 44,
    "EL2NSYNC": 45, "EL3HLT": 46, "EL3RST": 47, "ELNRNG": 48, "EUNATCH": 49, "ENOCSI": 50,
    "EL2HLT": 51, "EBADE": 52, "EBADR": 53, "EXFULL": 54, "ENOANO": 55, "EBADRQC": 56,
    "EBADSLT": 57, "EBFONT": 59, "ENOSTR": 60, "ENODATA": 61, "ETIME": 62, "ENOSR": 63,
    "ENONET": 64, "ENOPKG": 65, "EREMOTE": 66, "ENOLINK": 67, "EADV": 68, "ESRMNT": 69,
    "ECOMM": 70, "EPROTO": 71, "EMULTIHOP": 72, "EDOTDOT": 73, "EBADMSG": 74,
    "EOVERFLOW": 75, "ENOTUNIQ": 76, "EBADFD": 77, "EREMCHG": 78, "ELIBACC": 79,
    "ELIBBAD": 80, "ELIBSCN": 81, "ELIBMAX": 82, "ELIBEXEC": 83, "EILSEQ": 84,
    "ERESTART": 85, "ESTRPIPE": 86, "EUSERS": 87, "ENOTSOCK": 88, "EDESTADDRREQ": 89,
    "EMSGSIZE": 90, "EPROTOTYPE": 91, "ENOPROTOOPT": 92, "EPROTONOSUPPORT": 93,
    "ESOCKTNOSUPPORT": 94, "EOPNOTSUPP": 95, "EPFNOSUPPORT": 96, "EAFNOSUPPORT": 97,
    "EADDRINUSE": 98, "EADDRNOTAVAIL": 99, "ENETDOWN": 100, "ENETUNREACH": 101,
    "ENETRESET": 102, "ECONNABORTED": 103, "ECONNRESET": 104, "ENOBUFS": 105, "EISCONN": 106,
    "ENOTCONN": 107, "ESHUTDOWN": 108, "ETOOMANYREFS": 109, "ETIMEDOUT": 110,
    "ECONNREFUSED": 111, "EHOSTDOWN": 112, "EHOSTUNREACH": 113, "EALREADY": 114,
    "EINPROGRESS": 115, "ESTALE": 116, "EDQUOT": 122, "ECANCELED": 125,
    "EOWNERDEAD": 130, "ENOTRECOVERABLE": 131,
}

MACOS: dict[str, int] = {
    "EPERM": 1, "ENOENT": 2, "ESRCH": 3, "EINTR": 4, "EIO": 5, "ENXIO": 6, "E2BIG": 7,
    "ENOEXEC": 8, "EBADF": 9, "ECHILD": 10, "EDEADLK": 11, "ENOMEM": 12, "EACCES": 13,
    "EFAULT": 14, "ENOTBLK": 15, "EBUSY": 16, "EEXIST": 17, "EXDEV": 18, "ENODEV": 19,
    "ENOTDIR": 20, "EISDIR": 21, "EINVAL": 22, "ENFILE": 23, "EMFILE": 24, "ENOTTY": 25,
    "ETXTBSY": 26, "EFBIG": 27, "ENOSPC": 28, "ESPIPE": 29, "EROFS": 30, "EMLINK": 31,
    "EPIPE": 32, "EDOM": 33, "ERANGE": 34, "EAGAIN": 35, "EINPROGRESS": 36, "EALREADY": 37,
    "ENOTSOCK": 38, "EDESTADDRREQ": 39, "EMSGSIZE": 40, "EPROTOTYPE": 41, "ENOPROTOOPT": 42,
    "EPROTONOSUPPORT": 43, "ESOCKTNOSUPPORT": 44, "ENOTSUP": 45, "EPFNOSUPPORT": 46,
    "EAFNOSUPPORT": 47, "EADDRINUSE": 48, "EADDRNOTAVAIL": 49, "ENETDOWN": 50,
    "ENETUNREACH": 51, "ENETRESET": 52, "ECONNABORTED": 53, "ECONNRESET": 54, "ENOBUFS": 55,
    "EISCONN": 56, "ENOTCONN": 57, "ESHUTDOWN": 58, "ETOOMANYREFS": 59, "ETIMEDOUT": 60,
    "ECONNREFUSED": 61, "ELOOP": 62, "ENAMETOOLONG": 63, "EHOSTDOWN": 64, "EHOSTUNREACH": 65,
    "ENOTEMPTY": 66, "EPROCLIM": 67, "EUSERS": 68, "EDQUOT": 69, "ESTALE": 70, "EREMOTE": 71,
    "EBADRPC": 72, "ERPCMISMATCH": 73, "EPROGUNAVAIL": 74, "EPROGMISMATCH": 75,
    "EPROCUNAVAIL": 76, "ENOLCK": 77, "ENOSYS": 78, "EFTYPE": 79, "EAUTH": 80,
    "ENEEDAUTH": 81, "EPWROFF": 82, "EDEVERR": 83, "EOVERFLOW": 84, "EBADEXEC": 85,
    "EBADARCH": 86, "ESHLIBVERS": 87, "EBADMACHO": 88, "ECANCELED": 89, "EIDRM": 90,
    "ENOMSG": 91, "EILSEQ": 92, "ENOATTR": 93, "EBADMSG": 94, "EMULTIHOP": 95, "ENODATA": 96,
    "ENOLINK": 97, "ENOSR": 98, "ENOSTR": 99, "EPROTO": 100, "ETIME": 101, "EOPNOTSUPP": 102,
    "ENOPOLICY": 103, "ENOTRECOVERABLE": 104, "EOWNERDEAD": 105, "EQFULL": 106,
}

# WinSock codes: 10000 + the BSD number for the socket errors (and a few low ones).
WINDOWS_WSA: dict[str, int] = {
    name: 10000 + MACOS[name]
    for name in (
        "EINTR", "EBADF", "EACCES", "EFAULT", "EINVAL", "EMFILE", "EAGAIN", "EINPROGRESS",
        "EALREADY", "ENOTSOCK", "EDESTADDRREQ", "EMSGSIZE", "EPROTOTYPE", "ENOPROTOOPT",
        "EPROTONOSUPPORT", "ESOCKTNOSUPPORT", "EOPNOTSUPP", "EPFNOSUPPORT", "EAFNOSUPPORT",
        "EADDRINUSE", "EADDRNOTAVAIL", "ENETDOWN", "ENETUNREACH", "ENETRESET", "ECONNABORTED",
        "ECONNRESET", "ENOBUFS", "EISCONN", "ENOTCONN", "ESHUTDOWN", "ETOOMANYREFS",
        "ETIMEDOUT", "ECONNREFUSED", "ELOOP", "ENAMETOOLONG", "EHOSTDOWN", "EHOSTUNREACH",
    )
}
WINDOWS_WSA["EOPNOTSUPP"] = 10045  # WSAEOPNOTSUPP is 10045 (BSD ENOTSUP 45), not 10102
WINDOWS_WSA["EAGAIN"] = 10035  # WSAEWOULDBLOCK

# The Microsoft C runtime's errno (1-42 and the POSIX supplement 100-140).
WINDOWS_CRT: dict[str, int] = {
    **{name: LINUX[name] for name in (
        "EPERM", "ENOENT", "ESRCH", "EINTR", "EIO", "ENXIO", "E2BIG", "ENOEXEC", "EBADF",
        "ECHILD", "EAGAIN", "ENOMEM", "EACCES", "EFAULT", "EBUSY", "EEXIST", "EXDEV", "ENODEV",
        "ENOTDIR", "EISDIR", "EINVAL", "ENFILE", "EMFILE", "ENOTTY", "EFBIG", "ENOSPC",
        "ESPIPE", "EROFS", "EMLINK", "EPIPE", "EDOM", "ERANGE")},
    "EDEADLK": 36, "ENAMETOOLONG": 38, "ENOLCK": 39, "ENOSYS": 40, "ENOTEMPTY": 41,
    "EILSEQ": 42, "EADDRINUSE": 100, "EADDRNOTAVAIL": 101, "EAFNOSUPPORT": 102,
    "EALREADY": 103, "EBADMSG": 104, "ECANCELED": 105, "ECONNABORTED": 106,
    "ECONNREFUSED": 107, "ECONNRESET": 108, "EDESTADDRREQ": 109, "EHOSTUNREACH": 110,
    "EIDRM": 111, "EINPROGRESS": 112, "EISCONN": 113, "ELOOP": 114, "EMSGSIZE": 115,
    "ENETDOWN": 116, "ENETRESET": 117, "ENETUNREACH": 118, "ENOBUFS": 119, "ENODATA": 120,
    "ENOLINK": 121, "ENOMSG": 122, "ENOPROTOOPT": 123, "ENOSR": 124, "ENOSTR": 125,
    "ENOTCONN": 126, "ENOTRECOVERABLE": 127, "ENOTSOCK": 128, "ENOTSUP": 129,
    "EOPNOTSUPP": 130, "EOVERFLOW": 132, "EOWNERDEAD": 133, "EPROTO": 134,
    "EPROTONOSUPPORT": 135, "EPROTOTYPE": 136, "ETIME": 137, "ETIMEDOUT": 138,
    "ETXTBSY": 139,
}

# getaddrinfo() error codes. Windows reports the WSA "host" codes instead.
EAI_LINUX: dict[str, int] = {
    "EAI_BADFLAGS": -1, "EAI_NONAME": -2, "EAI_AGAIN": -3, "EAI_FAIL": -4, "EAI_NODATA": -5,
    "EAI_FAMILY": -6, "EAI_SOCKTYPE": -7, "EAI_SERVICE": -8, "EAI_MEMORY": -10,
    "EAI_SYSTEM": -11, "EAI_OVERFLOW": -12,
}
EAI_MACOS: dict[str, int] = {
    "EAI_AGAIN": 2, "EAI_BADFLAGS": 3, "EAI_FAIL": 4, "EAI_FAMILY": 5, "EAI_MEMORY": 6,
    "EAI_NODATA": 7, "EAI_NONAME": 8, "EAI_SERVICE": 9, "EAI_SOCKTYPE": 10, "EAI_SYSTEM": 11,
    "EAI_OVERFLOW": 14,
}
EAI_WINDOWS: dict[str, int] = {
    "EAI_NONAME": 11001, "EAI_AGAIN": 11002, "EAI_FAIL": 11003, "EAI_NODATA": 11004,
    "EAI_FAMILY": 10047, "EAI_MEMORY": 8, "EAI_SERVICE": 10109, "EAI_SOCKTYPE": 10044,
    "EAI_BADFLAGS": 10022,
}
WSA_NAMES: dict[int, str] = {
    11001: "WSAHOST_NOT_FOUND", 11002: "WSATRY_AGAIN", 11003: "WSANO_RECOVERY",
    11004: "WSANO_DATA",
}

# The message each symbol prints on Linux (strerror / gai_strerror), for matching log lines.
MESSAGES: dict[str, str] = {
    "ECONNRESET": "Connection reset by peer",
    "ECONNREFUSED": "Connection refused",
    "ECONNABORTED": "Software caused connection abort",
    "EPIPE": "Broken pipe",
    "ENETUNREACH": "Network is unreachable",
    "EHOSTUNREACH": "No route to host",
    "ENETDOWN": "Network is down",
    "EHOSTDOWN": "Host is down",
    "ENONET": "Machine is not on the network",
    "ETIMEDOUT": "Connection timed out",
    "ENETRESET": "Network dropped connection on reset",
    "ENOTCONN": "Transport endpoint is not connected",
    "ESHUTDOWN": "Cannot send after transport endpoint shutdown",
    "EPROTO": "Protocol error",
    "EAI_AGAIN": "Temporary failure in name resolution",
    "EAI_NONAME": "Name or service not known",
    "EAI_FAIL": "Non-recoverable failure in name resolution",
    "EAI_NODATA": "No address associated with hostname",
}


def platform_numbers(symbol: str) -> dict[str, int | None]:
    """The number ``symbol`` has on each platform (None where it does not exist)."""
    if symbol.startswith("EAI_"):
        return {
            "linux": EAI_LINUX.get(symbol),
            "macos": EAI_MACOS.get(symbol),
            "windows": EAI_WINDOWS.get(symbol),
        }
    return {
        "linux": LINUX.get(symbol),
        "macos": MACOS.get(symbol),
        "windows": WINDOWS_WSA.get(symbol, WINDOWS_CRT.get(symbol)),
    }


def symbols_for_number(number: int) -> dict[str, list[str]]:
    """Every symbol that ``number`` names, per platform (one number, many meanings)."""
    def find(table: dict[str, int]) -> list[str]:
        return [name for name, value in table.items() if value == number]

    windows = find(WINDOWS_WSA) + find(WINDOWS_CRT) + find(EAI_WINDOWS)
    if number in WSA_NAMES:
        windows.append(WSA_NAMES[number])
    return {
        "linux": find(LINUX) + find(EAI_LINUX),
        "macos": find(MACOS) + find(EAI_MACOS),
        "windows": list(dict.fromkeys(windows)),
    }
