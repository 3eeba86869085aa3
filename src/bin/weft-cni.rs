//! `weft-cni`: the CNI plugin binary. Container runtimes run it with the CNI environment and the
//! network configuration on stdin; everything happens in [`weft::cni`].

fn main() {
    std::process::exit(weft::cni::main())
}
