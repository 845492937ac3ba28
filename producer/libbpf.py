"""The few libbpf calls bcc's Python API does not wrap, through ctypes on libbpf.so.1.

- bpf_link_create: attach XDP as a BPF link, which the kernel releases when our process
  dies (even by SIGKILL), unlike bcc's netlink attach that outlives the process.
- bpf_xdp_query: which program (if any) is attached to an interface, and in which mode.
- bpf_prog_test_run_opts: run the loaded program on a packet we build (tests, benchmarks).
- bpf_map_lookup_and_delete_elem: end a flow atomically (read final counts and remove).
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import os

BPF_XDP = 37  # enum bpf_attach_type
BPF_TCX_EGRESS = 47  # since Linux 6.6

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2

XDP_ATTACHED_NONE, XDP_ATTACHED_DRV, XDP_ATTACHED_SKB, XDP_ATTACHED_HW, XDP_ATTACHED_MULTI = range(5)

XDP_DROP = 1
XDP_PASS = 2


class LinkCreateOpts(ct.Structure):
    # Prefix of struct bpf_link_create_opts; libbpf reads only the fields within `sz`.
    _fields_ = [("sz", ct.c_size_t), ("flags", ct.c_uint32), ("_pad", ct.c_uint32)]


class XdpQueryOpts(ct.Structure):
    # struct bpf_xdp_query_opts as of libbpf 1.1
    _fields_ = [
        ("sz", ct.c_size_t),
        ("prog_id", ct.c_uint32),
        ("drv_prog_id", ct.c_uint32),
        ("hw_prog_id", ct.c_uint32),
        ("skb_prog_id", ct.c_uint32),
        ("attach_mode", ct.c_uint8),
        ("_pad", ct.c_uint8 * 7),
        ("feature_flags", ct.c_uint64),
    ]


class TestRunOpts(ct.Structure):
    # struct bpf_test_run_opts
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


class BpfProgInfo(ct.Structure):
    # Prefix of struct bpf_prog_info, up to and including `name`.
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
    ]


def _load() -> ct.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    lib = ct.CDLL(name, use_errno=True)
    lib.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.POINTER(LinkCreateOpts)]
    lib.bpf_link_create.restype = ct.c_int
    lib.bpf_xdp_query.argtypes = [ct.c_int, ct.c_int, ct.POINTER(XdpQueryOpts)]
    lib.bpf_xdp_query.restype = ct.c_int
    lib.bpf_xdp_detach.argtypes = [ct.c_int, ct.c_uint32, ct.c_void_p]
    lib.bpf_xdp_detach.restype = ct.c_int
    lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(TestRunOpts)]
    lib.bpf_prog_test_run_opts.restype = ct.c_int
    lib.bpf_map_lookup_and_delete_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_lookup_and_delete_elem.restype = ct.c_int
    lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_prog_get_fd_by_id.restype = ct.c_int
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    lib.bpf_obj_get_info_by_fd.restype = ct.c_int
    return lib


_lib = _load()


def _check(ret: int, what: str) -> int:
    # libbpf 1.x returns -errno directly.
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def xdp_link_create(prog_fd: int, ifindex: int, flags: int) -> int:
    """Attach an XDP program to `ifindex` as a BPF link; returns the link fd (close to detach)."""
    opts = LinkCreateOpts(sz=ct.sizeof(LinkCreateOpts), flags=flags)
    return _check(_lib.bpf_link_create(prog_fd, ifindex, BPF_XDP, ct.byref(opts)), "bpf_link_create")


def tcx_egress_link_create(prog_fd: int, ifindex: int) -> int:
    """Attach a SCHED_CLS program to `ifindex`'s egress as a TCX link (Linux >= 6.6); returns
    the link fd (close to detach). Other TCX programs there keep running (we return NEXT)."""
    opts = LinkCreateOpts(sz=ct.sizeof(LinkCreateOpts))
    return _check(_lib.bpf_link_create(prog_fd, ifindex, BPF_TCX_EGRESS, ct.byref(opts)), "bpf_link_create")


def xdp_query(ifindex: int) -> XdpQueryOpts:
    """The XDP program ids attached to `ifindex` (0 when none) and the attach mode."""
    opts = XdpQueryOpts(sz=ct.sizeof(XdpQueryOpts))
    _check(_lib.bpf_xdp_query(ifindex, 0, ct.byref(opts)), "bpf_xdp_query")
    return opts


def xdp_detach(ifindex: int, flags: int) -> None:
    """Detach a netlink-attached XDP program (not a link) in the mode given by `flags`."""
    _check(_lib.bpf_xdp_detach(ifindex, flags, None), "bpf_xdp_detach")


def prog_name(prog_id: int) -> str:
    """The name of loaded program `prog_id` (as the kernel has it, at most 15 chars)."""
    fd = _check(_lib.bpf_prog_get_fd_by_id(prog_id), "bpf_prog_get_fd_by_id")
    try:
        info = BpfProgInfo()
        size = ct.c_uint32(ct.sizeof(info))
        _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "bpf_obj_get_info_by_fd")
        return info.name.decode(errors="replace")
    finally:
        os.close(fd)


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1) -> tuple[int, int]:
    """Run XDP program `prog_fd` on `packet` `repeat` times; returns (verdict, ns per run)."""
    buf = ct.create_string_buffer(packet, len(packet))
    out = ct.create_string_buffer(max(len(packet), 1) + 256)
    opts = TestRunOpts(
        sz=ct.sizeof(TestRunOpts),
        data_in=ct.cast(buf, ct.c_void_p),
        data_size_in=len(packet),
        data_out=ct.cast(out, ct.c_void_p),
        data_size_out=len(out),
        repeat=repeat,
    )
    _check(_lib.bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), "bpf_prog_test_run_opts")
    return opts.retval, opts.duration


def map_lookup_and_delete(map_fd: int, key: ct.Structure, value: ct.Structure) -> bool:
    """Atomically read and remove `key`; False when it was not there."""
    ret = _lib.bpf_map_lookup_and_delete_elem(map_fd, ct.byref(key), ct.byref(value))
    if ret == -2:  # ENOENT
        return False
    _check(ret, "bpf_map_lookup_and_delete_elem")
    return True


class BatchOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


_lib.bpf_map_lookup_batch.argtypes = [
    ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.POINTER(ct.c_uint32), ct.POINTER(BatchOpts),
]
_lib.bpf_map_lookup_batch.restype = ct.c_int
_lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
_lib.bpf_map_delete_elem.restype = ct.c_int


def map_lookup_batch_blobs(map_fd: int, key_size: int, value_size: int, chunk: int = 4096):
    """All entries of a hash map, one (keys, values) pair of bytes per syscall: the raw keys
    side by side, and their values likewise (at most `chunk` of each).

    Entries are copies; the map may change while we read (a batch read is not a snapshot).
    """
    keys = ct.create_string_buffer(key_size * chunk)
    values = ct.create_string_buffer(value_size * chunk)
    token_size = max(key_size, 8)
    in_batch, out_batch = ct.create_string_buffer(token_size), ct.create_string_buffer(token_size)
    opts = BatchOpts(sz=ct.sizeof(BatchOpts))
    first = True
    while True:
        count = ct.c_uint32(chunk)
        ret = _lib.bpf_map_lookup_batch(
            map_fd, None if first else in_batch, out_batch, keys, values, ct.byref(count), ct.byref(opts)
        )
        if ret < 0 and ret != -2:  # -ENOENT marks the last batch
            _check(ret, "bpf_map_lookup_batch")
        n = count.value
        if n:
            yield ct.string_at(keys, n * key_size), ct.string_at(values, n * value_size)
        if ret == -2 or n == 0:
            return
        ct.memmove(in_batch, out_batch, token_size)
        first = False


def map_lookup_batch_raw(map_fd: int, key_size: int, value_size: int, chunk: int = 4096):
    """All (key, value) pairs of a hash map as bytes (see map_lookup_batch_blobs)."""
    for kraw, vraw in map_lookup_batch_blobs(map_fd, key_size, value_size, chunk):
        yield from zip([kraw[i:i + key_size] for i in range(0, len(kraw), key_size)],
                       [vraw[i:i + value_size] for i in range(0, len(vraw), value_size)])


def map_lookup_batch(map_fd: int, key_type, value_type, chunk: int = 4096):
    """All (key, value) pairs of a hash map as ctypes structs (see map_lookup_batch_raw)."""
    for k, v in map_lookup_batch_raw(map_fd, ct.sizeof(key_type), ct.sizeof(value_type), chunk):
        yield key_type.from_buffer_copy(k), value_type.from_buffer_copy(v)


def map_delete(map_fd: int, key: ct.Structure) -> bool:
    """Remove `key`; False when it was not there."""
    ret = _lib.bpf_map_delete_elem(map_fd, ct.byref(key))
    if ret == -2:
        return False
    _check(ret, "bpf_map_delete_elem")
    return True
