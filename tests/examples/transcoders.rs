//! `scripts/bench transcoders`: jobs per minute through transcode workers
//! (docs/scale.md, "Transcode workers: jobs per minute").
//!
//! `jobs` (default 8) uploads of one 10-second 640x360 MPEG-4/MP3 clip
//! (every job a real re-encode to H.264/AAC) go through a real cluster
//! (release binaries, two nodes, the product's `veryfast` preset), timed
//! from the first upload to the last publication, in three set-ups: the
//! manager's own loop (`transcode.workers = 1`), one `transcoder` and two
//! `transcoder`s (`workers = 0`). The reference is the `ffmpeg` command
//! doing the same conversion (libx264 veryfast, CRF 23, AAC, faststart)
//! on the same clip in the same run, one at a time and two at once.
//!
//! Everything runs on this one machine: two workers share its cores with
//! each other and with the manager, so their scaling here says what two
//! transcodes at once cost on these cores, not what two machines give.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{ffmpeg, Cluster, ClusterOpts};

fn clip(path: &Path) {
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=640x360:rate=30",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        "10",
        "-c:v",
        "mpeg4",
        "-q:v",
        "4",
        "-c:a",
        "mp3",
        path.to_str().unwrap(),
    ]);
}

/// Jobs per minute of `jobs` ffmpeg conversions, `parallel` at a time.
fn reference(src: &Path, dir: &Path, jobs: usize, parallel: usize) -> f64 {
    let started = Instant::now();
    let mut left = jobs;
    let mut n = 0;
    while left > 0 {
        let batch = left.min(parallel);
        let handles: Vec<_> = (0..batch)
            .map(|_| {
                n += 1;
                let (src, out) = (src.to_path_buf(), dir.join(format!("ref-{n}.mp4")));
                std::thread::spawn(move || {
                    ffmpeg(&[
                        "-i",
                        src.to_str().unwrap(),
                        "-c:v",
                        "libx264",
                        "-preset",
                        "veryfast",
                        "-crf",
                        "23",
                        "-pix_fmt",
                        "yuv420p",
                        "-c:a",
                        "aac",
                        "-b:a",
                        "128k",
                        "-ar",
                        "48000",
                        "-ac",
                        "2",
                        "-movflags",
                        "+faststart",
                        out.to_str().unwrap(),
                    ])
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        left -= batch;
    }
    jobs as f64 / started.elapsed().as_secs_f64() * 60.0
}

/// Jobs per minute through a cluster with `local` manager loops and
/// `workers` transcoders.
async fn through_cluster(src: &Path, jobs: usize, local: usize, workers: usize) -> f64 {
    let mut opts = ClusterOpts::new(&["utah", "toronto"]);
    opts.transcode_extra = format!("workers = {local}\npreset = \"veryfast\"\n");
    let cluster = Cluster::start_with(&opts);
    let running: Vec<_> = (0..workers)
        .map(|i| cluster.start_transcoder(&format!("bench-{i}")))
        .collect();
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..jobs {
        let (s, v) = cluster.upload(src, &format!("clip {i}")).await.unwrap();
        assert_eq!(s, 202, "{v}");
        ids.push(v["asset_id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let v = cluster.wait_terminal(id, Duration::from_secs(1800)).await;
        assert_eq!(v["state"], "published", "{v}");
    }
    let rate = jobs as f64 / started.elapsed().as_secs_f64() * 60.0;
    drop(running);
    rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let jobs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("jobs: a number"))
        .unwrap_or(8);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("clip.avi");
    clip(&src);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("{jobs} jobs of a 10 s 640x360 clip on {cores} cores");
    let ref1 = reference(&src, dir.path(), jobs, 1);
    eprintln!("ffmpeg, one at a time: {ref1:.1} jobs/min");
    let ref2 = reference(&src, dir.path(), jobs, 2);
    eprintln!("ffmpeg, two at once: {ref2:.1} jobs/min");
    let local = through_cluster(&src, jobs, 1, 0).await;
    eprintln!("manager's own loop: {local:.1} jobs/min");
    let one = through_cluster(&src, jobs, 0, 1).await;
    eprintln!("one transcoder: {one:.1} jobs/min");
    let two = through_cluster(&src, jobs, 0, 2).await;
    eprintln!("two transcoders: {two:.1} jobs/min");
    println!("transcode workers, {jobs} jobs of a 10 s 640x360 clip, {cores} cores, same run:");
    println!("  ffmpeg command, one at a time   {ref1:6.1} jobs/min (reference)");
    println!(
        "  ffmpeg command, two at once     {ref2:6.1} jobs/min ({:.2}x one at a time)",
        ref2 / ref1
    );
    println!(
        "  manager's own loop (workers=1)  {local:6.1} jobs/min ({:.2}x ffmpeg)",
        local / ref1
    );
    println!(
        "  one transcoder (workers=0)      {one:6.1} jobs/min ({:.2}x ffmpeg)",
        one / ref1
    );
    println!(
        "  two transcoders (workers=0)     {two:6.1} jobs/min ({:.2}x ffmpeg, {:.2}x one transcoder; ffmpeg two at once: {:.2}x)",
        two / ref1,
        two / one,
        ref2 / ref1
    );
}
