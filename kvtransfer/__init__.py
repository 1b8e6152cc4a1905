"""KV-cache page transfer between workers (see docs/kvtransfer.md).

plan.py      which rank sends which (layers, heads) to which rank: a pure function of both layouts
protocol.py  typed msgspec messages; payloads as raw frames
pages.py     pages out of / into one rank's caches
receiver.py  per-rank frame bookkeeping (RankReceiver)
reservations.py  the decode driver's reservations (the state machine)
transport.py KVTransport: the interface the transfer code uses (KVClient, FakeKVClient implement it)
zmq_transport.py  ZeroMQ server/client I/O threads (control messages; page frames for the zmq transport)
outgoing.py  what one source rank sends for a request, layer by layer (OutgoingTransfer)
stream.py    the tcp transport's page stream: straight into the cache with recv_into
frames.py    page bytes as ZeroMQ frames, and host staging buffers (GPU caches)
dist_transport.py  pages through torch.distributed pair groups (gloo, NCCL)
"""
