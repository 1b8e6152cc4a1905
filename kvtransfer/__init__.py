"""KV-cache page transfer between workers (see docs/kvtransfer.md).

plan.py      which rank sends which (layers, heads) to which rank: a pure function of both layouts
protocol.py  typed msgspec messages; payloads as raw frames
pages.py     pages out of / into one rank's caches
receiver.py  per-rank frame bookkeeping and the decode driver's reservations (the state machine)
zmq_transport.py  ZeroMQ server/client I/O threads, layer-wise OutgoingTransfer
"""
