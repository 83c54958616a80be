//! Shared by every crate of the workspace that links a binary (the `pipeline` binary, test
//! binaries, benchmarks).
//!
//! - The mold linker, where it is installed (`scripts/setup.sh` installs it): linking libtorch,
//!   lance and DataFusion into a test binary takes seconds instead of most of a minute. Set
//!   here, per package, rather than in RUSTFLAGS, so that turning it on or off rebuilds no
//!   dependency.
//! - libtorch, for the crates that use tch, so that CUDA is seen at run time and the binaries
//!   find their libraries. `torch-sys` emits `-ltorch_cuda`, but the linker's `--as-needed`
//!   drops it because no symbol of it is referenced directly; on a GPU machine
//!   `tch::Cuda::is_available()` then says false. `--no-as-needed -ltorch` keeps libtorch.so
//!   (which NEEDs libtorch_cuda.so) in the binary, and the rpath lets it run without
//!   LD_LIBRARY_PATH on the machine that built it. On another machine (the GPU one)
//!   LD_LIBRARY_PATH pointing at that torch's lib folder takes over.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=PIPELINE_NO_MOLD");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let mold = ["/usr/bin/mold", "/usr/local/bin/mold"].into_iter().find(|p| Path::new(p).exists());
    if let (Some(mold), None) = (mold, std::env::var_os("PIPELINE_NO_MOLD")) {
        println!("cargo:rerun-if-changed={mold}");
        println!("cargo:rustc-link-arg=-fuse-ld=mold");
    }
    // Set for the crates that depend on torch-sys directly (`links = "tch"`).
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
