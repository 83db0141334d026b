//! `blockctl image create|ls|info|resize|rm|snap|clone|flatten|du|export|import|status`,
//! with `rbd`'s arguments, sizes and JSON output.

use super::progress::Progress;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};

use super::present::{
    image_info_json, parse_features, print_image_info, snap_json, snap_timestamp,
};
use super::size::{human, image_size, object_size, order};
use super::CephArgs;
use crate::rbd::{CreateOptions, Image, ImageSpec};

/// Bytes per I/O of import/export (one default object).
const CHUNK: usize = 4 << 20;
/// Granularity at which import and export skip zero data (keeps images and files sparse).
const SPARSE: usize = 64 << 10;

/// Layout and features of a new image (`create`, `clone`, `import`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LayoutArgs {
    /// Object size as a power of two (22 = 4 MiB, the default).
    #[arg(long, value_parser = order, conflicts_with = "object_size")]
    pub order: Option<u8>,
    /// Object size (4M, 65536, 1M): a power of two from 4K to 32M.
    #[arg(long, value_parser = object_size)]
    pub object_size: Option<u64>,
    /// Image features (repeatable or comma-separated: layering,exclusive-lock,...; default:
    /// the cluster's rbd_default_features).
    #[arg(long = "image-feature", value_name = "FEATURE")]
    pub features: Vec<String>,
    /// Image format: only 2 (format 1 is deprecated and not created by librbd 16).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=2))]
    pub image_format: u8,
}

impl LayoutArgs {
    fn options(&self) -> anyhow::Result<CreateOptions> {
        let features = if self.features.is_empty() {
            None
        } else {
            let mut bits = 0;
            for f in &self.features {
                bits |= parse_features(f)?;
            }
            Some(bits)
        };
        Ok(CreateOptions {
            order: self
                .order
                .or(self.object_size.map(|s| s.trailing_zeros() as u8)),
            features,
        })
    }
}

/// Image management.
#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Create an image: --size N[B|K|M|G|T] (a plain number is MiB).
    Create {
        #[command(flatten)]
        ceph: CephArgs,
        #[arg(long, short = 's', value_parser = image_size)]
        size: u64,
        #[command(flatten)]
        layout: LayoutArgs,
        /// POOL/IMAGE
        spec: String,
    },
    /// List the images of a pool (-l: sizes, parents, formats, snapshots).
    Ls {
        #[command(flatten)]
        ceph: CephArgs,
        #[arg(short = 'l', long = "long")]
        long: bool,
        #[arg(default_value = "rbd")]
        pool: String,
    },
    /// Show size, objects, order, id, block_name_prefix, features, timestamps (`rbd info`).
    Info {
        #[command(flatten)]
        ceph: CephArgs,
        /// POOL/IMAGE[@SNAP]
        #[allow(rustdoc::broken_intra_doc_links)] // clap help text, not markdown
        spec: String,
    },
    /// Resize an image; shrinking needs --allow-shrink.
    Resize {
        #[command(flatten)]
        ceph: CephArgs,
        /// New size (a plain number is MiB).
        #[arg(long, short = 's', value_parser = image_size)]
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
        #[command(flatten)]
        layout: LayoutArgs,
        parent: String,
        child: String,
    },
    /// Copy a clone's parent data into it and detach it from the parent.
    Flatten {
        #[command(flatten)]
        ceph: CephArgs,
        /// POOL/IMAGE
        spec: String,
    },
    /// Provisioned and used size, in whole objects (`rbd du`): one image (with its
    /// snapshots) or every image of a pool.
    Du {
        #[command(flatten)]
        ceph: CephArgs,
        /// Pool (when no image is given; default rbd).
        #[arg(long, short = 'p')]
        pool: Option<String>,
        /// POOL/IMAGE[@SNAP]
        #[allow(rustdoc::broken_intra_doc_links)] // clap help text, not markdown
        spec: Option<String>,
    },
    /// Import a file (`-`: stdin) as a new image; zero blocks are skipped.
    Import {
        #[command(flatten)]
        ceph: CephArgs,
        #[command(flatten)]
        layout: LayoutArgs,
        #[arg(long)]
        no_progress: bool,
        file: String,
        /// POOL/IMAGE
        spec: String,
    },
    /// Export an image or snapshot to a file (`-`: stdout); zero blocks become holes.
    Export {
        #[command(flatten)]
        ceph: CephArgs,
        #[arg(long)]
        no_progress: bool,
        /// Replace an existing file (rbd refuses, and so does blockctl without this).
        #[arg(long)]
        overwrite: bool,
        /// POOL/IMAGE[@SNAP]
        #[allow(rustdoc::broken_intra_doc_links)] // clap help text, not markdown
        spec: String,
        file: String,
    },
    /// Clients that have the image open (header watchers).
    Status {
        #[command(flatten)]
        ceph: CephArgs,
        /// POOL/IMAGE
        spec: String,
    },
    /// LUKS encryption (Ceph images, as `rbd encryption`).
    #[command(subcommand)]
    Encryption(EncryptionCommand),
}

/// `image encryption ...`.
#[derive(clap::Subcommand, Debug)]
pub enum EncryptionCommand {
    /// Write a LUKS1/LUKS2 header (AES-256) protected by the passphrase in
    /// PASSPHRASE_FILE (its whole content), as `rbd encryption format`; serve the image
    /// with `bdev_rbd_create --encryption-format luks2 --key NAME`.
    Format {
        #[command(flatten)]
        ceph: CephArgs,
        /// POOL/IMAGE
        spec: String,
        /// luks1 or luks2
        #[arg(value_name = "FORMAT")]
        encryption_format: String,
        /// A file holding the passphrase (same rules as keyring key files: mode 0600,
        /// owned by you, not a symlink)
        passphrase_file: std::path::PathBuf,
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

/// Read-only open: does not show as a watcher.
fn open_ro(ceph: &CephArgs, spec: &ImageSpec) -> anyhow::Result<Image> {
    let r = ceph.connect()?;
    Ok(r.ioctx(&spec.pool)?
        .open_read_only(&spec.image, spec.snap.as_deref())?)
}

/// Runs an `image` subcommand, printing results on stdout and progress on stderr.
pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Create {
            ceph,
            size,
            layout,
            spec,
        } => {
            let s = ImageSpec::parse(&spec)?;
            let o = layout.options()?;
            ceph.connect()?
                .ioctx(&s.pool)?
                .create_image(&s.image, size, &o)?;
        }
        ImageCommand::Ls { ceph, long, pool } => ls(&ceph, long, &pool)?,
        ImageCommand::Info { ceph, spec } => {
            let s = ImageSpec::parse(&spec)?;
            let info = open_ro(&ceph, &s)?.info()?;
            ceph.emit(image_info_json(&info), || print_image_info(&info));
        }
        ImageCommand::Resize {
            ceph,
            size,
            allow_shrink,
            spec,
        } => {
            let s = ImageSpec::parse(&spec)?;
            let img = open(&ceph, &s)?;
            if size < img.size()? && !allow_shrink {
                anyhow::bail!("shrinking {s} loses data: add --allow-shrink");
            }
            img.resize(size)?;
        }
        ImageCommand::Rm { ceph, spec } => {
            let s = ImageSpec::parse(&spec)?;
            ceph.connect()?.ioctx(&s.pool)?.remove_image(&s.image)?;
        }
        ImageCommand::Snap(c) => snap(c)?,
        ImageCommand::Clone {
            ceph,
            layout,
            parent,
            child,
        } => {
            let (p, snap) = ImageSpec::parse_snap(&parent)?;
            let c = ImageSpec::parse(&child)?;
            let r = ceph.connect()?;
            let pio = r.ioctx(&p.pool)?;
            let cio = r.ioctx(&c.pool)?;
            pio.clone_image(&p.image, &snap, &cio, &c.image, &layout.options()?)?;
        }
        ImageCommand::Flatten { ceph, spec } => {
            open(&ceph, &ImageSpec::parse(&spec)?)?.flatten()?;
        }
        ImageCommand::Du { ceph, pool, spec } => du(&ceph, pool, spec)?,
        ImageCommand::Import {
            ceph,
            layout,
            no_progress,
            file,
            spec,
        } => import(&ceph, &layout.options()?, !no_progress, &file, &spec)?,
        ImageCommand::Export {
            ceph,
            no_progress,
            overwrite,
            spec,
            file,
        } => export(&ceph, !no_progress, overwrite, &spec, &file)?,
        ImageCommand::Encryption(EncryptionCommand::Format {
            ceph,
            spec,
            encryption_format,
            passphrase_file,
        }) => {
            let s = ImageSpec::parse(&spec)?;
            let format = crate::rbd::EncryptionFormat::parse(&encryption_format)?;
            let path = std::path::absolute(&passphrase_file)?;
            let pass = crate::keyring::load_key_file("passphrase", &path)?;
            open(&ceph, &s)?.encryption_format(format, pass.as_slice())?;
        }
        ImageCommand::Status { ceph, spec } => {
            let s = ImageSpec::parse(&spec)?;
            let w = open_ro(&ceph, &s)?.watchers()?;
            let v: Vec<Value> = w
                .iter()
                .map(|w| json!({"address": w.address, "client": w.client, "cookie": w.cookie}))
                .collect();
            ceph.emit(json!({ "watchers": v }), || {
                if w.is_empty() {
                    println!("Watchers: none");
                } else {
                    println!("Watchers:");
                    for w in &w {
                        println!(
                            "\twatcher={} client.{} cookie={}",
                            w.address, w.client, w.cookie
                        );
                    }
                }
            });
        }
    }
    Ok(())
}

/// `rbd ls [-l]`.
fn ls(ceph: &CephArgs, long: bool, pool: &str) -> anyhow::Result<()> {
    let r = ceph.connect()?;
    let io = r.ioctx(pool)?;
    let names = io.list_images()?;
    if !long {
        ceph.emit(json!(names), || {
            for i in &names {
                println!("{i}");
            }
        });
        return Ok(());
    }
    let mut rows: Vec<Value> = Vec::new();
    for name in &names {
        // An image removed since the listing is skipped, as rbd does.
        let img = match io.open_read_only(name, None) {
            Ok(i) => i,
            Err(e) if e.errno == libc::ENOENT => continue,
            Err(e) => return Err(e.into()),
        };
        let info = img.info()?;
        let mut row = json!({"image": name, "id": info.id, "size": info.size, "format": 2});
        if let Some(p) = &info.parent {
            row["parent"] = json!(p);
        }
        rows.push(row);
        for s in img.snap_list()? {
            rows.push(json!({
                "image": name, "id": info.id, "snapshot": s.name, "snapshot_id": s.id,
                "size": s.size, "protected": s.protected.to_string(), "format": 2,
            }));
        }
    }
    ceph.emit(json!(rows), || {
        println!(
            "{:<40} {:>10} {:<30} {:>3} {:<4}",
            "NAME", "SIZE", "PARENT", "FMT", "PROT"
        );
        for r in &rows {
            let name = match r["snapshot"].as_str() {
                Some(s) => format!("{}@{s}", r["image"].as_str().unwrap_or("")),
                None => r["image"].as_str().unwrap_or("").to_string(),
            };
            let prot = if r["protected"] == "true" { "yes" } else { "" };
            println!(
                "{:<40} {:>10} {:<30} {:>3} {:<4}",
                name,
                human(r["size"].as_u64().unwrap_or(0)),
                r["parent"].as_str().unwrap_or(""),
                2,
                prot
            );
        }
    });
    Ok(())
}

/// `rbd du`: per image, each snapshot's objects changed since the previous one, then the
/// head's since the last snapshot (whole objects, as rbd counts them).
fn du(ceph: &CephArgs, pool: Option<String>, spec: Option<String>) -> anyhow::Result<()> {
    let r = ceph.connect()?;
    let (pool, only, only_snap) = match &spec {
        Some(s) => {
            let s = ImageSpec::parse(s)?;
            (s.pool, Some(s.image), s.snap)
        }
        None => (pool.unwrap_or_else(|| "rbd".into()), None, None),
    };
    let io = r.ioctx(&pool)?;
    let names = match &only {
        Some(i) => vec![i.clone()],
        None => io.list_images()?,
    };
    let mut rows: Vec<Value> = Vec::new();
    let (mut prov, mut used) = (0u64, 0u64);
    for name in &names {
        let head = match io.open_read_only(name, None) {
            Ok(i) => i,
            Err(e) if e.errno == libc::ENOENT && only.is_none() => continue,
            Err(e) => return Err(e.into()),
        };
        let id = head.info()?.id;
        let mut prev: Option<String> = None;
        for s in head.snap_list()? {
            let img = io.open_read_only(name, Some(&s.name))?;
            let u = img.used_bytes(prev.as_deref())?;
            if only_snap.as_deref().is_none_or(|x| x == s.name) {
                rows.push(json!({"name": name, "id": id, "snapshot": s.name,
                                  "snapshot_id": s.id, "provisioned_size": s.size,
                                  "used_size": u}));
                prov += s.size;
                used += u;
            }
            prev = Some(s.name);
        }
        if only_snap.is_none() {
            let size = head.size()?;
            let u = head.used_bytes(prev.as_deref())?;
            rows.push(json!({"name": name, "id": id, "provisioned_size": size,
                              "used_size": u}));
            prov += size;
            used += u;
        }
    }
    let v = json!({"images": rows, "total_provisioned_size": prov, "total_used_size": used});
    ceph.emit(v, || {
        println!("{:<40} {:>12} {:>12}", "NAME", "PROVISIONED", "USED");
        for r in &rows {
            let name = match r["snapshot"].as_str() {
                Some(s) => format!("{}@{s}", r["name"].as_str().unwrap_or("")),
                None => r["name"].as_str().unwrap_or("").to_string(),
            };
            println!(
                "{:<40} {:>12} {:>12}",
                name,
                human(r["provisioned_size"].as_u64().unwrap_or(0)),
                human(r["used_size"].as_u64().unwrap_or(0))
            );
        }
        if rows.len() > 1 {
            println!("{:<40} {:>12} {:>12}", "<TOTAL>", human(prov), human(used));
        }
    });
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
        let snaps = open_ro(ceph, &s)?.snap_list()?;
        let v: Vec<Value> = snaps.iter().map(snap_json).collect();
        let stamps: Vec<String> = snaps.iter().map(snap_timestamp).collect();
        ceph.emit(json!(v), || {
            print_snap_table(
                snaps
                    .iter()
                    .zip(&stamps)
                    .map(|(s, t)| (s.id, s.name.as_str(), s.size, s.protected, t.as_str())),
            )
        });
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

fn read_full(f: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes the non-zero SPARSE-sized runs of `buf` at `off`.
fn write_sparse(img: &Image, off: u64, buf: &[u8]) -> anyhow::Result<()> {
    let zero = |r: &[u8]| r.iter().all(|b| *b == 0);
    let n = buf.len();
    let mut i = 0;
    while i < n {
        let end = (i + SPARSE).min(n);
        if zero(&buf[i..end]) {
            i = end;
            continue;
        }
        let mut j = end;
        while j < n {
            let e = (j + SPARSE).min(n);
            if zero(&buf[j..e]) {
                break;
            }
            j = e;
        }
        img.write_at(off + i as u64, &buf[i..j])?;
        i = j;
    }
    Ok(())
}

fn import(
    ceph: &CephArgs,
    o: &CreateOptions,
    progress: bool,
    file: &str,
    spec: &str,
) -> anyhow::Result<()> {
    let s = ImageSpec::parse(spec)?;
    // stdin has no size: the image grows as data arrives.
    let (mut input, size): (Box<dyn Read>, Option<u64>) = if file == "-" {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let f = File::open(file).with_context(|| format!("opening {file}"))?;
        let len = f.metadata()?.len();
        (Box::new(f), Some(len))
    };
    let r = ceph.connect()?;
    let io = r.ioctx(&s.pool)?;
    io.create_image(&s.image, size.unwrap_or(0), o)?;
    let result = (|| -> anyhow::Result<()> {
        let img = io.open(&s.image, None)?;
        let mut buf = vec![0u8; CHUNK];
        let mut off = 0u64;
        let mut p = Progress::new("Importing image", size.unwrap_or(0), progress);
        loop {
            let n = read_full(&mut input, &mut buf).with_context(|| format!("reading {file}"))?;
            if n == 0 {
                break;
            }
            if size.is_none() {
                img.resize(off + n as u64)?;
            } else if size.is_some_and(|sz| off + n as u64 > sz) {
                anyhow::bail!("{file} grew while importing");
            }
            write_sparse(&img, off, &buf[..n])?;
            off += n as u64;
            p.update(off);
        }
        if size.is_some_and(|sz| off != sz) {
            anyhow::bail!("{file} shrank while importing");
        }
        img.flush()?;
        p.done(None);
        Ok(())
    })();
    if let Err(e) = result {
        // Do not leave a half-imported image behind.
        if let Err(r) = io.remove_image(&s.image) {
            tracing::warn!("cannot remove the half-imported image {s}: {r}");
        }
        return Err(e.context(format!("importing {file} to {s}")));
    }
    Ok(())
}

fn export(
    ceph: &CephArgs,
    progress: bool,
    overwrite: bool,
    spec: &str,
    file: &str,
) -> anyhow::Result<()> {
    let s = ImageSpec::parse(spec)?;
    let img = open_ro(ceph, &s)?;
    let size = img.size()?;
    let mut out: Box<dyn Write> = if file == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(SparseFile::create(Path::new(file), overwrite)?)
    };
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let mut p = Progress::new("Exporting image", size, progress);
    while off < size {
        let len = (size - off).min(CHUNK as u64) as usize;
        let n = img.read_at(off, &mut buf[..len])?;
        if n != len {
            anyhow::bail!("short read at {off} of {s}: {n} of {len} bytes");
        }
        out.write_all(&buf[..len])
            .with_context(|| format!("writing {file}"))?;
        off += len as u64;
        p.update(off);
    }
    out.flush().with_context(|| format!("writing {file}"))?;
    drop(out);
    p.done(None);
    Ok(())
}

/// A file written front to back whose zero SPARSE-sized runs become holes.
struct SparseFile {
    f: File,
    pos: u64,
}

impl SparseFile {
    fn create(path: &Path, overwrite: bool) -> anyhow::Result<Self> {
        let mut o = std::fs::OpenOptions::new();
        o.write(true);
        if overwrite {
            o.create(true).truncate(true);
        } else {
            o.create_new(true);
        }
        let f = o.open(path).with_context(|| {
            format!(
                "creating {}{}",
                path.display(),
                if overwrite {
                    ""
                } else {
                    " (use --overwrite to replace it)"
                }
            )
        })?;
        Ok(SparseFile { f, pos: 0 })
    }
}

impl Write for SparseFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for piece in buf.chunks(SPARSE) {
            if piece.iter().all(|b| *b == 0) {
                self.f.seek(SeekFrom::Current(piece.len() as i64))?;
            } else {
                self.f.write_all(piece)?;
            }
            self.pos += piece.len() as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // A trailing hole needs the length set explicitly.
        self.f.set_len(self.pos)?;
        self.f.sync_all()
    }
}

/// `rbd snap ls`'s table: (id, name, size, protected, timestamp) rows under a header, for
/// Ceph and local pools alike.
pub(super) fn print_snap_table<'a>(rows: impl Iterator<Item = (u64, &'a str, u64, bool, &'a str)>) {
    println!(
        "{:>6}  {:<24} {:>12}  {:<9}  TIMESTAMP",
        "SNAPID", "NAME", "SIZE", "PROTECTED"
    );
    for (id, name, size, protected, timestamp) in rows {
        println!(
            "{:>6}  {:<24} {:>12}  {:<9}  {}",
            id,
            name,
            human(size),
            if protected { "yes" } else { "no" },
            timestamp
        );
    }
}
