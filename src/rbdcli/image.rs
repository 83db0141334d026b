//! `blockctl image create|ls|info|resize|rm|snap|clone|import|export`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::CephArgs;
use crate::rbd::{CreateOptions, Image, ImageSpec};

/// Bytes per I/O of import/export (one default object).
const CHUNK: usize = 4 << 20;
/// Granularity at which import skips zero data (keeps the image sparse).
const SPARSE: usize = 64 << 10;

/// Image management.
#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Create an image.
    Create {
        #[command(flatten)]
        ceph: CephArgs,
        /// Size in MiB.
        #[arg(long, short = 's')]
        size: u64,
        /// Object size as a power of two (22 = 4 MiB).
        #[arg(long)]
        order: Option<u8>,
        /// POOL/IMAGE
        spec: String,
    },
    /// List the images of a pool.
    Ls {
        #[command(flatten)]
        ceph: CephArgs,
        #[arg(default_value = "rbd")]
        pool: String,
    },
    /// Show size, objects, order, features, block_name_prefix ... (like `rbd info`).
    Info {
        #[command(flatten)]
        ceph: CephArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// POOL/IMAGE
        spec: String,
    },
    /// Resize an image; shrinking needs --allow-shrink.
    Resize {
        #[command(flatten)]
        ceph: CephArgs,
        /// New size in MiB.
        #[arg(long, short = 's')]
        size: u64,
        #[arg(long)]
        allow_shrink: bool,
        /// POOL/IMAGE
        spec: String,
    },
    /// Remove an image.
    Rm {
        #[command(flatten)]
        ceph: CephArgs,
        /// POOL/IMAGE
        spec: String,
    },
    /// Snapshots.
    #[command(subcommand)]
    Snap(SnapCommand),
    /// Clone a protected snapshot: POOL/IMAGE@SNAP POOL/CHILD.
    Clone {
        #[command(flatten)]
        ceph: CephArgs,
        parent: String,
        child: String,
    },
    /// Import a file as a new image (zero blocks are skipped, the image stays sparse).
    Import {
        #[command(flatten)]
        ceph: CephArgs,
        file: PathBuf,
        /// POOL/IMAGE
        spec: String,
    },
    /// Export an image (or POOL/IMAGE@SNAP) to a file (sparse).
    Export {
        #[command(flatten)]
        ceph: CephArgs,
        /// POOL/IMAGE[@SNAP]
        spec: String,
        file: PathBuf,
    },
}

/// `image snap ...`: every spec is POOL/IMAGE@SNAP (`ls` takes POOL/IMAGE).
#[derive(clap::Subcommand, Debug)]
pub enum SnapCommand {
    Create {
        #[command(flatten)]
        ceph: CephArgs,
        spec: String,
    },
    Ls {
        #[command(flatten)]
        ceph: CephArgs,
        spec: String,
    },
    Rm {
        #[command(flatten)]
        ceph: CephArgs,
        spec: String,
    },
    Rollback {
        #[command(flatten)]
        ceph: CephArgs,
        spec: String,
    },
    Protect {
        #[command(flatten)]
        ceph: CephArgs,
        spec: String,
    },
    Unprotect {
        #[command(flatten)]
        ceph: CephArgs,
        spec: String,
    },
}

fn open(ceph: &CephArgs, spec: &ImageSpec) -> anyhow::Result<Image> {
    let r = ceph.connect()?;
    Ok(r.ioctx(&spec.pool)?
        .open(&spec.image, spec.snap.as_deref())?)
}

fn mib(size: u64) -> anyhow::Result<u64> {
    size.checked_mul(1 << 20)
        .ok_or_else(|| anyhow::anyhow!("size {size} MiB is too large"))
}

fn human(bytes: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes;
    let mut i = 0;
    while v >= 1024 && v.is_multiple_of(1024) && i < U.len() - 1 {
        v /= 1024;
        i += 1;
    }
    format!("{v} {}", U[i])
}

/// Runs an `image` subcommand, printing results on stdout and progress on stderr.
pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Create {
            ceph,
            size,
            order,
            spec,
        } => {
            let s = ImageSpec::parse(&spec)?;
            let r = ceph.connect()?;
            let o = CreateOptions {
                order,
                features: None,
            };
            r.ioctx(&s.pool)?.create_image(&s.image, mib(size)?, &o)?;
        }
        ImageCommand::Ls { ceph, pool } => {
            for i in ceph.connect()?.ioctx(&pool)?.list_images()? {
                println!("{i}");
            }
        }
        ImageCommand::Info { ceph, json, spec } => {
            let s = ImageSpec::parse(&spec)?;
            let info = open(&ceph, &s)?.info()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("rbd image '{}':", info.name);
                println!("\tsize {} in {} objects", human(info.size), info.num_objs);
                println!("\torder {} ({} objects)", info.order, human(info.obj_size));
                println!("\tsnapshot_count: {}", info.snapshot_count);
                println!("\tid: {}", info.id);
                println!("\tblock_name_prefix: {}", info.block_name_prefix);
                println!("\tformat: 2");
                println!("\tfeatures: {}", info.features.join(", "));
                if let Some(p) = &info.parent {
                    println!("\tparent: {p}");
                }
            }
        }
        ImageCommand::Resize {
            ceph,
            size,
            allow_shrink,
            spec,
        } => {
            let s = ImageSpec::parse(&spec)?;
            let img = open(&ceph, &s)?;
            let new = mib(size)?;
            if new < img.size()? && !allow_shrink {
                anyhow::bail!("shrinking {s} loses data: add --allow-shrink");
            }
            img.resize(new)?;
        }
        ImageCommand::Rm { ceph, spec } => {
            let s = ImageSpec::parse(&spec)?;
            ceph.connect()?.ioctx(&s.pool)?.remove_image(&s.image)?;
        }
        ImageCommand::Snap(c) => snap(c)?,
        ImageCommand::Clone {
            ceph,
            parent,
            child,
        } => {
            let (p, snap) = ImageSpec::parse_snap(&parent)?;
            let c = ImageSpec::parse(&child)?;
            let r = ceph.connect()?;
            let pio = r.ioctx(&p.pool)?;
            let cio = r.ioctx(&c.pool)?;
            pio.clone_image(&p.image, &snap, &cio, &c.image, &CreateOptions::default())?;
        }
        ImageCommand::Import { ceph, file, spec } => import(&ceph, &file, &spec)?,
        ImageCommand::Export { ceph, spec, file } => export(&ceph, &spec, &file)?,
    }
    Ok(())
}

fn snap(cmd: SnapCommand) -> anyhow::Result<()> {
    let (ceph, spec) = match &cmd {
        SnapCommand::Create { ceph, spec }
        | SnapCommand::Ls { ceph, spec }
        | SnapCommand::Rm { ceph, spec }
        | SnapCommand::Rollback { ceph, spec }
        | SnapCommand::Protect { ceph, spec }
        | SnapCommand::Unprotect { ceph, spec } => (ceph, spec),
    };
    if let SnapCommand::Ls { .. } = cmd {
        let s = ImageSpec::parse(spec)?;
        let img = open(ceph, &s)?;
        println!("{:>6}  {:<24} {:>12}  PROTECTED", "SNAPID", "NAME", "SIZE");
        for sn in img.snap_list()? {
            println!(
                "{:>6}  {:<24} {:>12}  {}",
                sn.id,
                sn.name,
                human(sn.size),
                if sn.protected { "yes" } else { "no" }
            );
        }
        return Ok(());
    }
    let (mut s, name) = ImageSpec::parse_snap(spec)?;
    s.snap = None;
    let img = open(ceph, &s)?;
    match cmd {
        SnapCommand::Create { .. } => img.snap_create(&name)?,
        SnapCommand::Rm { .. } => img.snap_remove(&name)?,
        SnapCommand::Rollback { .. } => img.snap_rollback(&name)?,
        SnapCommand::Protect { .. } => img.snap_protect(&name)?,
        SnapCommand::Unprotect { .. } => img.snap_unprotect(&name)?,
        SnapCommand::Ls { .. } => {}
    }
    Ok(())
}

/// Progress on stderr, one line per 10 %.
struct Progress {
    what: &'static str,
    total: u64,
    shown: u64,
}

impl Progress {
    fn update(&mut self, done: u64) {
        let pct = (done * 100).checked_div(self.total).unwrap_or(100);
        if pct >= self.shown + 10 || (pct == 100 && self.shown < 100) {
            self.shown = pct - pct % 10;
            eprintln!("{}: {pct}% complete...", self.what);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn import(ceph: &CephArgs, file: &Path, spec: &str) -> anyhow::Result<()> {
    let s = ImageSpec::parse(spec)?;
    let mut f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let size = f.metadata()?.len();
    let r = ceph.connect()?;
    let io = r.ioctx(&s.pool)?;
    io.create_image(&s.image, size, &CreateOptions::default())?;
    let img = io.open(&s.image, None)?;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let mut p = Progress {
        what: "Importing image",
        total: size,
        shown: 0,
    };
    while off < size {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            anyhow::bail!("{} shrank while importing", file.display());
        }
        // Write only the runs of non-zero SPARSE-sized pieces.
        let mut i = 0;
        while i < n {
            let end = (i + SPARSE).min(n);
            if buf[i..end].iter().all(|b| *b == 0) {
                i = end;
                continue;
            }
            let mut j = end;
            while j < n {
                let e = (j + SPARSE).min(n);
                if buf[j..e].iter().all(|b| *b == 0) {
                    break;
                }
                j = e;
            }
            img.write_at(off + i as u64, &buf[i..j])?;
            i = j;
        }
        off += n as u64;
        p.update(off);
    }
    img.flush()?;
    eprintln!("Importing image: done ({} to {s})", human(size));
    Ok(())
}

fn export(ceph: &CephArgs, spec: &str, file: &Path) -> anyhow::Result<()> {
    let s = ImageSpec::parse(spec)?;
    let img = open(ceph, &s)?;
    let size = img.size()?;
    let mut f = File::create(file).with_context(|| format!("creating {}", file.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let mut p = Progress {
        what: "Exporting image",
        total: size,
        shown: 0,
    };
    while off < size {
        let len = (size - off).min(CHUNK as u64) as usize;
        let n = img.read_at(off, &mut buf[..len])?;
        if n != len {
            anyhow::bail!("short read at {off} of {s}: {n} of {len} bytes");
        }
        if buf[..len].iter().all(|b| *b == 0) {
            f.seek(SeekFrom::Current(len as i64))?;
        } else {
            f.write_all(&buf[..len])?;
        }
        off += len as u64;
        p.update(off);
    }
    f.set_len(size)?;
    f.sync_all()?;
    eprintln!("Exporting image: done ({} from {s})", human(size));
    Ok(())
}
