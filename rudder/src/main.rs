// Stub until the daemon lands: the modules are compiled here so their tests run.
#![allow(dead_code)]

mod dataplane;

fn main() {}
