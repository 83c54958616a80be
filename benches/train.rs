//! Training-step and embedding throughput beside PyTorch eager, in one run, same machine.
//!
//!     cargo bench --profile dev --bench train -- [--batch 32] [--size 224] [--threads 2] [--steps 5] [--device cpu|cuda] [--bf16] [--channels-last]
//!
//! `--channels-last` runs both sides in NHWC memory order (weights and inputs), as the train
//! and embed stages do by default; without it both run NCHW.
//!
//! Both sides: MobileNetV2 → GeM → Linear 256 → BN → ArcFace (s=30, m=0.5), AdamW with a
//! separate head learning rate, random inputs in 0..1 normalised inside the step, 300 classes.
//! The Rust side is this crate's own `Net`, `Loss` and `Optimizer` (what the train stage runs,
//! minus data loading and augmentation); the peer is benches/peer_train.py in the setup's venv.
//! Rounds alternate Rust / PyTorch so drifting machine load hits both alike; medians are
//! reported, with the ratio Rust / PyTorch (> 1: Rust is faster).

use std::process::Command;
use std::time::Instant;

use pipeline::model::loss::{Loss, LossSpec};
use pipeline::model::neck::{NeckConfig, Pooling};
use pipeline::model::net::{Net, NetSpec};
use pipeline::model::optim::{OptimConfig, Optimizer};
use tch::{Device, Kind, Tensor};

struct Args {
    batch: i64,
    size: i64,
    threads: i32,
    steps: usize,
    device: String,
    bf16: bool,
    channels_last: bool,
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (training img/s, embedding img/s unfolded, embedding img/s with the BatchNorms folded as
/// the embed stage runs it).
fn rust_round(a: &Args) -> (f64, f64, f64) {
    let device = if a.device == "cuda" { Device::Cuda(0) } else { Device::Cpu };
    tch::manual_seed(0);
    let spec = NetSpec {
        backbone: "mobilenet_v2".into(),
        neck: NeckConfig { pooling: Pooling::Gem { p: 3.0, learnable: true, eps: 1e-6 }, embedding_dim: 256, dropout: 0.0 },
        input_size: a.size as u32,
        crop: None,
    };
    let mut net = Net::new(&spec, device).expect("net");
    if a.channels_last {
        net.use_channels_last();
    }
    let classes = 300;
    let loss = Loss::new(
        &net.vs.root().sub("loss").set_group(1),
        &[(1.0, LossSpec::ArcFace { s: 30.0, m: 0.5, easy_margin: false })],
        256,
        &vec![4; classes],
    );
    let mut opt = Optimizer::new(&net.vs, OptimConfig::default(), true);
    opt.set_lr(0, 2e-4);
    opt.set_lr(1, 2e-3);
    let x = Tensor::rand([a.batch, 3, a.size, a.size], (Kind::Float, device));
    let y = Tensor::randint(classes as i64, [a.batch], (Kind::Int64, device));
    let sync = || {
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
    };
    let step = |opt: &mut Optimizer| {
        let emb = if a.bf16 && device.is_cuda() { tch::autocast(true, || net.forward(&x, true)) } else { net.forward(&x, true) };
        let l = loss.forward(&emb, &y);
        opt.zero_grad();
        l.backward();
        opt.step();
    };
    step(&mut opt);
    sync();
    let mut times = Vec::new();
    for _ in 0..a.steps {
        let t = Instant::now();
        step(&mut opt);
        sync();
        times.push(t.elapsed().as_secs_f64());
    }
    let train = a.batch as f64 / median(times);
    let xe = Tensor::rand([64, 3, a.size, a.size], (Kind::Float, device));
    let embed = |net: &Net| if a.bf16 && device.is_cuda() { tch::autocast(true, || net.embed(&xe, false)) } else { net.embed(&xe, false) };
    let time = |net: &Net| {
        let _ = embed(net);
        sync();
        let mut et = Vec::new();
        for _ in 0..(a.steps / 2).max(2) {
            let t = Instant::now();
            let _ = embed(net);
            sync();
            et.push(t.elapsed().as_secs_f64());
        }
        64.0 / median(et)
    };
    let plain = time(&net);
    assert!(net.fold_batchnorm(), "mobilenet_v2 folds");
    let folded = time(&net);
    (train, plain, folded)
}

fn python() -> String {
    let venv = std::env::var("VIRTUAL_ENV").unwrap_or_else(|_| {
        format!("{}/.cache/pipeline/venv", std::env::var("HOME").unwrap_or_default())
    });
    format!("{venv}/bin/python")
}

fn peer_round(a: &Args) -> (f64, f64) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peer_train.py");
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .args(["--batch", &a.batch.to_string(), "--size", &a.size.to_string(), "--threads", &a.threads.to_string()])
        .args(["--steps", &a.steps.to_string(), "--device", &a.device]);
    if a.bf16 {
        cmd.arg("--bf16");
    }
    if a.channels_last {
        cmd.arg("--channels-last");
    }
    let out = cmd.output().expect("run the PyTorch peer (scripts/setup.sh makes its venv)");
    assert!(out.status.success(), "peer failed: {}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap_or("")).expect("peer JSON");
    (v["train_images_per_s"].as_f64().unwrap(), v["embed_images_per_s"].as_f64().unwrap())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let a = Args {
        batch: arg(&args, "--batch", 32),
        size: arg(&args, "--size", 224),
        threads: arg(&args, "--threads", 2),
        steps: arg(&args, "--steps", 5),
        device: arg(&args, "--device", "cpu".to_string()),
        bf16: args.iter().any(|x| x == "--bf16"),
        channels_last: args.iter().any(|x| x == "--channels-last"),
    };
    tch::set_num_threads(a.threads);
    let rounds = arg(&args, "--rounds", 2usize);
    println!(
        "mobilenet_v2 + GeM + 256 + ArcFace, batch {} at {}², {} threads, device {}{}{}; {} timed steps per round, {rounds} rounds",
        a.batch,
        a.size,
        a.threads,
        a.device,
        if a.bf16 { " bf16" } else { "" },
        if a.channels_last { " channels-last" } else { " NCHW" },
        a.steps
    );
    let (mut rt, mut re, mut ru, mut pt, mut pe) = (vec![], vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        let (t, u, e) = rust_round(&a);
        println!("round {r}: rust    train {t:7.2} img/s  embed {e:7.2} img/s (BatchNorm folded; {u:.2} unfolded)");
        rt.push(t);
        re.push(e);
        ru.push(u);
        let (t, e) = peer_round(&a);
        println!("round {r}: pytorch train {t:7.2} img/s  embed {e:7.2} img/s");
        pt.push(t);
        pe.push(e);
    }
    let (rt, re, ru, pt, pe) = (median(rt), median(re), median(ru), median(pt), median(pe));
    println!(
        "median: train rust {rt:.2} vs pytorch {pt:.2} img/s = {:.2}x; embed rust {re:.2} (folded) vs pytorch {pe:.2} img/s = {:.2}x; unfolded {ru:.2} = {:.2}x",
        rt / pt,
        re / pe,
        ru / pe
    );
}
