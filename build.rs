//! Link libtorch so that CUDA is seen at run time and the binary finds its libraries.
//!
//! `torch-sys` emits `-ltorch_cuda`, but the linker's `--as-needed` drops it because no symbol
//! of it is referenced directly; on a GPU machine `tch::Cuda::is_available()` then says false.
//! `--no-as-needed -ltorch` keeps libtorch.so (which NEEDs libtorch_cuda.so) in the binary, and
//! the rpath lets the binary run without LD_LIBRARY_PATH on the machine that built it. On another
//! machine (the GPU one) LD_LIBRARY_PATH pointing at that torch's lib folder takes over.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        // Set because torch-sys is a direct dependency (`links = "tch"`).
        if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        }
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
