"""How page bytes become ZeroMQ frames and come back: zero-copy frames of a CPU cache straight through
libzmq (`CacheFrames`), and host staging buffers for a cache that is not in host memory (a GPU's),
page-locked, on both ends (`host_frames` on the sender, `Staged` on the receiver).
"""

from __future__ import annotations

import ctypes
import errno
import logging

import numpy as np
import torch
import zmq

from kvtransfer.pages import to_bytes_view

log = logging.getLogger(__name__)


class CacheFrames:
    """Zero-copy frames of KV-cache memory straight through libzmq (`zmq_msg_init_data` with no free
    function, then `zmq_msg_send`, by ctypes on the symbols pyzmq's own libzmq exports): ~2 us a
    frame, against ~20-40 us for pyzmq's zero-copy frames, each a Python object whose release hops
    through pyzmq's garbage-collector thread and the GIL (measured at 16 MiB in 60 frames: the
    sender's CPU 7.5 -> 5.9 ms).

    NOTE: with no free function libzmq does not tell when it is done with a frame, so this is only for
    memory that outlives the sockets: the client keeps the cache arrays its frames point into (`keep`)
    until its ZeroMQ context has terminated (`KVClient.close_sockets`), after which libzmq holds
    nothing. The pages' contents must stay put until the receiver's Ack, as with any zero-copy send;
    after a failed transfer libzmq may still send queued frames of freed blocks, which the receiver
    drops (that attempt is over there: its deadline passes before the sender's Ack deadline)."""

    def __init__(self):
        self.kept: dict[int, np.ndarray] = {}  # id -> cache byte view
        from zmq.backend.cython import _zmq
        lib = ctypes.CDLL(_zmq.__file__)  # dlsym finds libzmq's symbols through the extension's needs
        self._init, self._send, self._close = lib.zmq_msg_init_data, lib.zmq_msg_send, lib.zmq_msg_close
        self._init.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
        self._send.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self._close.argtypes = [ctypes.c_void_p]
        self._errno = lib.zmq_errno
        self._msg = ctypes.create_string_buffer(64)  # a zmq_msg_t; zmq_msg_send leaves it empty again

    @classmethod
    def make(cls) -> CacheFrames | None:
        try:
            return cls()
        except (OSError, AttributeError, ImportError) as e:  # a pyzmq without the cython backend's libzmq
            log.info("KV frames go through pyzmq's zero-copy path: %s", e)
            return None

    def keep(self, owners: list[np.ndarray]) -> None:
        for o in owners:
            self.kept.setdefault(id(o), o)

    def send(self, sock: zmq.Socket, head: bytes, frames: list[np.ndarray]) -> None:
        """[head, *frames] as one message (blocking, as pyzmq's send_multipart; a signal is retried, as
        pyzmq does). On an error the message is left unfinished: the caller must close the socket."""
        sock.send(head, zmq.SNDMORE)
        handle, msg, last = sock.underlying, self._msg, len(frames) - 1
        for i, f in enumerate(frames):
            self._init(msg, f.ctypes.data, f.nbytes, None, None)
            while self._send(msg, handle, zmq.SNDMORE if i < last else 0) < 0:
                err = self._errno()
                if err != errno.EINTR:
                    self._close(msg)
                    raise zmq.ZMQError(err)


def host_frames(payload: list, stage: bool) -> tuple[list, object]:
    """Byte views for ZeroMQ frames of the payload's parts (CPU arrays or tensors, or GPU tensors with
    `stage`): as they are, or with `stage` copied into one host buffer for the message, page-locked
    for a GPU (torch's caching host allocator hands the same buffers out again), asynchronously:
    `ready`, a CUDA event (None when nothing is in flight), tells when the copies are done (the
    sender's I/O thread waits for it, not the caller: a prefill's layer callback never blocks on the
    GPU)."""
    if not stage:
        return [to_bytes_view(t) for t in payload], None
    gpu = [t for t in payload if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
    device = gpu[0].device if gpu else torch.device("cpu")
    parts = [t if isinstance(t, torch.Tensor) else torch.from_numpy(t) for t in payload]
    buf = host_buffer(sum(t.nbytes for t in parts), device)
    frames, off = [], 0
    for t in parts:
        dst = buf[off:off + t.nbytes]
        dst.view(t.dtype).view(t.shape).copy_(t, non_blocking=True)
        frames.append(dst.numpy())  # a view: the frame keeps the buffer alive until libzmq is done
        off += t.nbytes
    ready = None
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
    return frames, ready


class Staged(list):
    """Landing places in one host buffer (page-locked when the cache is on a GPU), one byte view per
    expected frame; `frames()` gives the same places as tensors, to copy into the cache from."""

    def __init__(self, buffer: torch.Tensor, sizes: list[int]):
        self.buffer = buffer
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        array = buffer.numpy()
        super().__init__(array[a:b] for a, b in zip(offsets, offsets[1:]))

    def frames(self) -> list[torch.Tensor]:
        return [self.buffer[a:b] for a, b in zip(self.offsets, self.offsets[1:])]


def host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A host byte buffer for frames of a cache on `device`: page-locked for a GPU (its copies then run
    asynchronously, and torch's caching host allocator hands the same buffers out again), plain for a
    CPU cache (tests of the staged path)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
