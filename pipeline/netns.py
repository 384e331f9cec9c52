"""A private network namespace, made without root: the processes in it reach each other over a
127.0.0.1 of their own, and nothing they listen on is reachable from outside it, not even from
this host's 127.0.0.1.

TensorFlow's gRPC servers listen on every interface whatever address their cluster spec names (see
pipeline.cluster): this is what keeps a local cluster's servers to itself.

A holder process (`python -m pipeline.netns`, single-threaded, as `unshare` requires) makes a new
user namespace, in which this user may make a network namespace, maps this user's ids onto
themselves (files written inside keep their owner), brings its loopback interface up, and waits
until its launcher closes its stdin or dies. The launcher's other children join its namespaces
with `setns` between fork and exec (`private_network`'s `join`).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

# Where a local cluster's servers can be reached from, not what they compute: it cannot change a
# result (see pipeline.fingerprint).
AFFECTS_RESULTS = False

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sh22x"  # struct ifreq: the interface's name, then ifr_flags in its 24-byte union
_PR_SET_PDEATHSIG = 1
READY = "ready"
_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceUnavailable(OSError):
    """This process may not make a private network namespace (user namespaces not allowed)."""


def _checked(result: int, call: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{call}: {os.strerror(number)}")


def die_with_parent() -> None:
    """In a child between fork and exec: be killed when the process that started it ends."""
    _checked(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL), "prctl(PR_SET_PDEATHSIG)")


def enter_new() -> None:
    """Move this single-threaded process into a new user and network namespace with loopback up."""
    uid, gid = os.geteuid(), os.getegid()
    _checked(_libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET), "unshare(CLONE_NEWUSER | CLONE_NEWNET)")
    # An unprivileged user may map its own ids only once it gives up setgroups.
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        name, flags = struct.unpack(_IFREQ, fcntl.ioctl(probe, _SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0)))
        fcntl.ioctl(probe, _SIOCSIFFLAGS, struct.pack(_IFREQ, name, flags | _IFF_UP))


@contextlib.contextmanager
def private_network() -> Iterator[Callable[[], None]]:
    """A private network namespace for as long as the block runs. Yields `join`, to call in a child
    between fork and exec (a Popen preexec_fn): it moves the child into the namespace. Raises
    NamespaceUnavailable, with the kernel's reason, where user namespaces are not allowed."""
    holder = subprocess.Popen([sys.executable, "-m", "pipeline.netns"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent)
    namespaces: list[int] = []
    try:
        said = holder.stdout.readline().strip()
        if said != READY:
            raise NamespaceUnavailable(f"no private network namespace: {said or holder.stdout.read().strip()}")
        # Opened here, while the holder surely lives; the children only call setns on them.
        namespaces = [os.open(f"/proc/{holder.pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC) for kind in ("user", "net")]

        def join() -> None:
            for namespace in namespaces:  # the user namespace first: it grants the right to join the other
                _checked(_libc.setns(namespace, 0), "setns")

        yield join
    finally:
        for namespace in namespaces:
            os.close(namespace)
        holder.stdin.close()
        holder.kill()
        holder.wait()
        holder.stdout.close()


@functools.cache
def unavailable_because() -> str | None:
    """Why this process may not make a private network namespace; None when it may."""
    try:
        with private_network():
            return None
    except NamespaceUnavailable as error:
        return str(error)


if __name__ == "__main__":
    try:
        enter_new()
    except OSError as error:
        print(error, flush=True)
        sys.exit(1)
    print(READY, flush=True)
    sys.stdin.read()  # until the launcher closes the pipe, or dies
