//! Placeholder so the `ebpf` branch compiles on its own; the `tun` branch holds the real
//! module (take that side when merging).
