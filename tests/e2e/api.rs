//! The HTTP API under abuse, as a process (`pipeline serve`): bearer tokens, uploads over the
//! pixel limit, malformed and decompression-bomb uploads, a burst of uploads past the
//! concurrency limit (shed with 503 and Retry-After) while lookups by id go on being answered,
//! error bodies that do not name the lake's paths, and the server's memory held to a bound.

use std::time::Duration;

use crate::common;

/// A PNG whose header promises `w`×`h` pixels, with a few bytes of pixel data behind it.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    let idat = b"IDAT\x78\x9C\x03\x00\x00\x00\x00\x01";
    out.extend_from_slice(&8u32.to_be_bytes());
    out.extend_from_slice(idat);
    out.extend_from_slice(&crc32(idat).to_be_bytes());
    let iend = b"IEND";
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(iend);
    out.extend_from_slice(&crc32(iend).to_be_bytes());
    out
}

/// A real PNG of `w`×`h` noise.
fn png_noise(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7 + y * 13) as u8, (x ^ y) as u8, (x * y) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_under_abuse_sheds_uploads_keeps_answering_lookups_and_holds_its_memory() {
    let f = common::demo(4, 4, 17);
    let (_plan, lake, _) = common::run_fresh(&f).await;
    let (_, b) = pipeline::query::query(&lake, "SELECT photo_id FROM embeddings ORDER BY photo_id LIMIT 1").await.unwrap();
    let some_photo = arrow::array::AsArray::as_string::<i32>(b[0].column(0)).value(0).to_string();
    let token = "a-token-long-enough-0123";
    std::fs::write(f.dir.path().join("tokens"), format!("# who may ask\nresearcher {token}\n")).unwrap();
    let served = common::serve(
        &["--pipeline", f.pipeline.to_str().unwrap(), "--token-file", "tokens", "--uploads", "1", "--max-upload-pixels", "2000000", "--refresh", "0"],
        f.dir.path(),
    )
    .await;
    let base = format!("http://127.0.0.1:{}", served.port);
    let client = reqwest::Client::new();
    let auth = format!("Bearer {token}");

    // Tokens: /healthz is open; everything else needs one of the file's tokens.
    assert_eq!(served.get("/healthz").await.unwrap().0, 200);
    let r = client.get(format!("{base}/similar/{some_photo}")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers().get("www-authenticate").unwrap(), "Bearer");
    let r = client.get(format!("{base}/similar/{some_photo}")).header("authorization", "Bearer not-the-token-at-all").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = client.get(format!("{base}/similar/{some_photo}?k=3")).header("authorization", &auth).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let post = |body: Vec<u8>| {
        let (client, base, auth) = (client.clone(), base.clone(), auth.clone());
        async move {
            // A server that refuses an upload (413, or shed with 503) before reading its body
            // may close the connection while a large body is still being sent: the client then
            // sees the connection go, which is the refusal too (status 0 here).
            match client.post(format!("{base}/similar?k=3")).header("authorization", auth).body(body).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                    (status, retry, r.text().await.unwrap_or_default())
                }
                Err(e) => (0, None, e.to_string()),
            }
        }
    };
    let photo = std::fs::read(f.dir.path().join("demo-lake/photos").join(&some_photo)).unwrap();
    let (status, _, body) = post(photo.clone()).await;
    assert_eq!(status, 200, "{body}");
    let settled = memory_kib(served.pid(), "VmRSS:");

    // Over the pixel limit, a bomb, malformed bytes: refused by name, before any decoding, and
    // no answer names where the lake or the photos are.
    let lake_dir = f.dir.path().to_string_lossy().to_string();
    for (what, body, want) in [
        ("2.4 MP over a 2 MP limit", png_noise(2000, 1200), 413),
        ("a 1.6-gigapixel bomb", png_header(40_000, 40_000), 413),
        ("not an image", b"GIF89a but not really".to_vec(), 400),
        ("a truncated JPEG", photo[..photo.len() / 3].to_vec(), 400),
    ] {
        let (status, _, text) = post(body).await;
        assert!(status == want || (status == 0 && want == 413), "{what}: {status} {text}");
        assert!(!text.contains(&lake_dir) && !text.contains("file://"), "{what}: the answer names a path: {text}");
    }
    let (status, _, text) = {
        let r = client.get(format!("{base}/similar/no-such-photo.jpg")).header("authorization", &auth).send().await.unwrap();
        (r.status().as_u16(), (), r.text().await.unwrap())
    };
    assert_eq!(status, 404);
    assert!(!text.contains(&lake_dir), "{text}");

    // A burst: 24 uploads (valid ones, bombs, oversized and malformed) at once against a limit
    // of one upload at a time, while 24 lookups by id are made. The uploads past the limit are
    // shed at once with 503 and Retry-After; every lookup is answered.
    let mut uploads = Vec::new();
    for i in 0..24 {
        let body = match i % 4 {
            0 | 1 => photo.clone(),
            2 => png_header(40_000, 40_000),
            _ => png_noise(2000, 1200),
        };
        uploads.push(tokio::spawn(post(body)));
    }
    let mut lookups = Vec::new();
    for _ in 0..24 {
        let (client, url, auth) = (client.clone(), format!("{base}/similar/{some_photo}?k=5"), auth.clone());
        lookups.push(tokio::spawn(async move {
            let t = std::time::Instant::now();
            let r = client.get(url).header("authorization", auth).send().await.unwrap();
            (r.status().as_u16(), t.elapsed())
        }));
    }
    let (mut ok, mut shed, mut said_503) = (0, 0, 0);
    for u in uploads {
        let (status, retry, text) = u.await.unwrap();
        match status {
            200 | 400 | 413 => ok += 1,
            // Refused while its body was still being sent (the connection closed under it).
            0 => shed += 1,
            503 => {
                assert_eq!(retry.as_deref(), Some("1"), "{text}");
                shed += 1;
                said_503 += 1;
            }
            other => panic!("upload answered {other}: {text}"),
        }
    }
    // The bombs' bodies are a few dozen bytes: those shed are always answered with the 503.
    assert!(ok >= 1 && said_503 >= 1, "{ok} answered, {shed} shed, {said_503} of them with 503");
    let mut times = Vec::new();
    for l in lookups {
        let (status, took) = l.await.unwrap();
        assert_eq!(status, 200, "every lookup by id is answered during the burst");
        times.push(took);
    }
    times.sort();
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!("burst: {ok} uploads answered, {shed} shed; {} lookups by id: p50 {:?}, p99 {:?}", times.len(), pct(0.5), pct(0.99));
    assert!(times[times.len() - 1] < Duration::from_secs(30), "within the request timeout");

    // The server's peak memory over the whole test stays within a bound above what it held
    // once the model was loaded and one photo embedded: the uploads' bodies (at most the body
    // limit each, the shed ones never read) and one decode at the pixel limit.
    let peak = memory_kib(served.pid(), "VmHWM:");
    let bound = settled + 400 * 1024;
    println!("memory: {} MiB settled, {} MiB peak, bound {} MiB", settled / 1024, peak / 1024, bound / 1024);
    assert!(peak < bound, "peak {peak} KiB over the bound {bound} KiB");
}
