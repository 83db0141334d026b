//! `blockctl image ...` / `blockctl pool ...` on the embedded local pool
//! ([`crate::localpool`]), and the dispatch between it and Ceph.
//!
//! A spec addresses the local pool when it starts with `local:` (`local:mypool/vm1`,
//! `local:mypool/vm1@snap`, `image ls local:mypool`), or for every spec when `--local`/`-L`
//! is given (also what makes `pool ls` list local pools). Everything else goes to Ceph,
//! unchanged. The root of the local pools is `--pool-dir`, else `$BLOCKD_POOL_DIR`, else
//! `/var/lib/blockd/pools`.
//!
//! `--format json` (the rbd commands' own flag) applies to `ls`, `info`, `du`, `status` and
//! `snap ls` of local pools too; sizes use the rbd commands' syntax. Progress of import/export/rollback/clone is shown on stderr when
//! it is a terminal; the summary line always.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use serde_json::json;

use super::image::{EncryptionCommand, ImageCommand, SnapCommand};
use super::pool::PoolCommand;
use super::progress::Progress;
use super::size::human;
use super::{CephArgs, Format};
use crate::localpool::{ExportDest, ImportSource, Pool, PoolRoot};
use crate::rbd::ImageSpec;

/// The prefix that makes a spec local.
pub const PREFIX: &str = "local:";

/// Options of every `image`/`pool` subcommand, given anywhere after `image`/`pool`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LocalPoolArgs {
    /// Every spec names a local pool (as if prefixed with `local:`); `pool ls` lists local
    /// pools.
    #[arg(long = "local", short = 'L', global = true)]
    pub local: bool,
    /// Root directory of the local pools (default: $BLOCKD_POOL_DIR, else
    /// /var/lib/blockd/pools).
    #[arg(long, global = true, value_name = "DIR")]
    pub pool_dir: Option<PathBuf>,
    /// Output format: taken from the command's own `--format` (see [`CephArgs`]).
    #[arg(skip)]
    pub format: Format,
}

impl LocalPoolArgs {
    /// The spec without its `local:` prefix when it names a local pool.
    fn local<'a>(&self, spec: &'a str) -> Option<&'a str> {
        spec.strip_prefix(PREFIX)
            .or(if self.local { Some(spec) } else { None })
    }

    fn root(&self) -> PoolRoot {
        PoolRoot::resolve(self.pool_dir.as_deref())
    }

    fn json(&self) -> bool {
        self.format == Format::Json
    }
}

/// `blockctl image ...`: the rbd commands, on Ceph or a local pool.
#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    #[command(flatten)]
    pub opts: LocalPoolArgs,
    #[command(subcommand)]
    pub cmd: ImageCommand,
}

/// `blockctl pool ...`.
#[derive(clap::Args, Debug)]
pub struct PoolArgs {
    #[command(flatten)]
    pub opts: LocalPoolArgs,
    #[command(subcommand)]
    pub cmd: PoolCommand,
}

/// `POOL/IMAGE[@SNAP]` of a local spec (without prefix), on `root`.
fn parse(root: &PoolRoot, spec: &str) -> anyhow::Result<(Pool, ImageSpec)> {
    let s = ImageSpec::parse(spec)?;
    Ok((root.pool(&s.pool)?, s))
}

fn parse_snap(root: &PoolRoot, spec: &str) -> anyhow::Result<(Pool, String, String)> {
    let (s, snap) = ImageSpec::parse_snap(spec)?;
    Ok((root.pool(&s.pool)?, s.image, snap))
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The connection/format arguments every image subcommand has.
fn ceph_of(cmd: &ImageCommand) -> &CephArgs {
    match cmd {
        ImageCommand::Create { ceph, .. }
        | ImageCommand::Ls { ceph, .. }
        | ImageCommand::Info { ceph, .. }
        | ImageCommand::Resize { ceph, .. }
        | ImageCommand::Rm { ceph, .. }
        | ImageCommand::Clone { ceph, .. }
        | ImageCommand::Flatten { ceph, .. }
        | ImageCommand::Du { ceph, .. }
        | ImageCommand::Import { ceph, .. }
        | ImageCommand::Export { ceph, .. }
        | ImageCommand::Status { ceph, .. }
        | ImageCommand::Encryption(EncryptionCommand::Format { ceph, .. }) => ceph,
        ImageCommand::Snap(
            SnapCommand::Create { ceph, .. }
            | SnapCommand::Ls { ceph, .. }
            | SnapCommand::Rm { ceph, .. }
            | SnapCommand::Rollback { ceph, .. }
            | SnapCommand::Protect { ceph, .. }
            | SnapCommand::Unprotect { ceph, .. },
        ) => ceph,
    }
}

/// Runs an `image` subcommand on the local pool or Ceph, as its spec says.
pub fn run_image(opts: &LocalPoolArgs, cmd: ImageCommand) -> anyhow::Result<()> {
    let mut opts = opts.clone();
    opts.format = if ceph_of(&cmd).json() {
        Format::Json
    } else {
        Format::Plain
    };
    let root = opts.root();
    match local_image(&opts, &root, cmd)? {
        None => Ok(()),
        Some(c) => super::image::run(c),
    }
}

/// Runs `cmd` when it names a local pool (`Ok(None)`); hands it back otherwise.
fn local_image(
    opts: &LocalPoolArgs,
    root: &PoolRoot,
    cmd: ImageCommand,
) -> anyhow::Result<Option<ImageCommand>> {
    match cmd {
        ImageCommand::Create {
            size,
            ref layout,
            ref spec,
            ..
        } => {
            let Some(spec) = opts.local(spec) else {
                return Ok(Some(cmd));
            };
            if layout.order.is_some() || layout.object_size.is_some() || !layout.features.is_empty()
            {
                bail!("--order, --object-size and --image-feature apply to Ceph images only");
            }
            let (pool, s) = parse(root, spec)?;
            if s.snap.is_some() {
                bail!("{spec}: an image name cannot contain '@'");
            }
            pool.create_image(&s.image, size)?;
        }
        ImageCommand::Ls { ref pool, .. } => {
            let Some(name) = opts.local(pool) else {
                return Ok(Some(cmd));
            };
            let names = root.pool(name)?.list_images()?;
            if opts.json() {
                print_json(&names)?;
            } else {
                names.iter().for_each(|n| println!("{n}"));
            }
        }
        ImageCommand::Info { ref spec, .. } => {
            let Some(spec) = opts.local(spec) else {
                return Ok(Some(cmd));
            };
            let (pool, s) = parse(root, spec)?;
            let i = pool.info(&s.image)?;
            if opts.json() {
                print_json(&i)?;
            } else {
                println!("local image '{}':", i.name);
                println!("\tpool: {}", i.pool);
                println!("\tsize {} ({} bytes)", human(i.size), i.size);
                println!("\tsnapshot_count: {}", i.snapshot_count);
                println!("\tcreated: {}", i.created);
                println!("\tfeatures: {}", i.features.join(", "));
                if let Some(p) = &i.parent {
                    println!("\tparent: {}{}/{}@{}", PREFIX, p.pool, p.image, p.snapshot);
                }
                println!("\tpath: {}", i.path.display());
                println!("\tused: {}", human(i.used));
                println!("\tin_use: {}", if i.in_use { "yes" } else { "no" });
            }
        }
        ImageCommand::Resize {
            size,
            allow_shrink,
            ref spec,
            ..
        } => {
            let Some(spec) = opts.local(spec) else {
                return Ok(Some(cmd));
            };
            let (pool, s) = parse(root, spec)?;
            pool.resize(&s.image, size, allow_shrink)
                .map_err(|e| match e {
                    crate::localpool::Error::Invalid(m) => anyhow!("{m}: add --allow-shrink"),
                    e => e.into(),
                })?;
        }
        ImageCommand::Rm { ref spec, .. } => {
            let Some(spec) = opts.local(spec) else {
                return Ok(Some(cmd));
            };
            let (pool, s) = parse(root, spec)?;
            pool.remove_image(&s.image)?;
        }
        ImageCommand::Snap(ref sc) => {
            let spec = match sc {
                SnapCommand::Create { spec, .. }
                | SnapCommand::Ls { spec, .. }
                | SnapCommand::Rm { spec, .. }
                | SnapCommand::Rollback { spec, .. }
                | SnapCommand::Protect { spec, .. }
                | SnapCommand::Unprotect { spec, .. } => spec,
            };
            let Some(spec) = opts.local(spec) else {
                return Ok(Some(cmd));
            };
            snap(opts, root, sc, spec)?;
        }
        ImageCommand::Clone {
            ref parent,
            ref child,
            ..
        } => {
            let (Some(p), Some(c)) = (opts.local(parent), opts.local(child)) else {
                if opts.local(parent).is_some() || opts.local(child).is_some() {
                    bail!("a local image can only be cloned to a local pool, and vice versa");
                }
                return Ok(Some(cmd));
            };
            let (ppool, pimage, psnap) = parse_snap(root, p)?;
            let (cpool, cs) = parse(root, c)?;
            let total = ppool.info(&pimage)?.size;
            let mut pr = Progress::new("Cloning image", total, true);
            let how =
                ppool.clone_image(&pimage, &psnap, &cpool, &cs.image, &mut |d| pr.update(d))?;
            pr.done(Some(&format!("{how:?}").to_lowercase()));
        }
        ImageCommand::Import {
            ref file,
            ref spec,
            no_progress,
            ..
        } => {
            let Some(spec) = opts.local(spec) else {
                return Ok(Some(cmd));
            };
            import(root, Path::new(file), spec, no_progress)?;
        }
        ImageCommand::Export {
            ref spec,
            ref file,
            no_progress,
            overwrite,
            ..
        } => {
            let Some(spec) = opts.local(spec) else {
                return Ok(Some(cmd));
            };
            let file = Path::new(file);
            if file != Path::new("-") && !overwrite && file.exists() {
                bail!("{} exists: add --overwrite to replace it", file.display());
            }
            export(root, spec, file, no_progress)?;
        }
        ImageCommand::Flatten { ref spec, .. } => {
            let Some(spec) = opts.local(spec) else {
                return Ok(Some(cmd));
            };
            let (pool, s) = parse(root, spec)?;
            pool.flatten(&s.image)?;
        }
        ImageCommand::Du {
            ref pool, ref spec, ..
        } => {
            let local = match (spec, pool) {
                (Some(s), _) => opts.local(s).map(|s| (s, true)),
                (None, Some(p)) => opts.local(p).map(|p| (p, false)),
                (None, None) => opts.local.then_some(("rbd", false)),
            };
            let Some((name, is_image)) = local else {
                return Ok(Some(cmd));
            };
            if is_image {
                let (pool, s) = parse(root, name)?;
                du(opts, &pool, &[s.image])?;
            } else {
                let pool = root.pool(name)?;
                let images = pool.list_images()?;
                du(opts, &pool, &images)?;
            }
        }
        ImageCommand::Status { ref spec, .. } => {
            let Some(spec) = opts.local(spec) else {
                return Ok(Some(cmd));
            };
            let (pool, s) = parse(root, spec)?;
            let served = pool.in_use(&s.image)?;
            if opts.json() {
                print_json(&json!({ "in_use": served }))?;
            } else if served {
                println!("served by a blockd bdev (bdev_local_create)");
            } else {
                println!("not served");
            }
        }
        ImageCommand::Encryption(EncryptionCommand::Format { ref spec, .. }) => {
            if opts.local(spec).is_some() {
                bail!("{spec}: LUKS formatting applies to Ceph images (use bdev_crypto_create over a local image)");
            }
            return Ok(Some(cmd));
        }
    }
    Ok(None)
}

fn snap(
    opts: &LocalPoolArgs,
    root: &PoolRoot,
    cmd: &SnapCommand,
    spec: &str,
) -> anyhow::Result<()> {
    if let SnapCommand::Ls { .. } = cmd {
        let (pool, s) = parse(root, spec)?;
        let snaps = pool.snap_list(&s.image)?;
        if opts.json() {
            return print_json(&snaps);
        }
        super::image::print_snap_table(snaps.iter().map(|s| {
            (
                s.id,
                s.name.as_str(),
                s.size,
                s.protected,
                s.created.as_str(),
            )
        }));
        return Ok(());
    }
    let (pool, image, name) = parse_snap(root, spec)?;
    match cmd {
        SnapCommand::Create { .. } => {
            let served = pool.in_use(&image)?;
            let how = pool.snap_create(&image, &name)?;
            if served && how == crate::localpool::CopyMethod::Sparse {
                eprintln!(
                    "warning: {image} is served and the filesystem has no reflinks: the \
                     snapshot was copied while writes went on, it is not point-in-time"
                );
            }
        }
        SnapCommand::Rm { .. } => pool.snap_remove(&image, &name)?,
        SnapCommand::Rollback { .. } => {
            let total = pool.info(&image)?.size;
            let mut pr = Progress::new("Rolling back to snapshot", total, true);
            pool.snap_rollback(&image, &name, &mut |d| pr.update(d))?;
            pr.done(Some(&format!("{PREFIX}{}/{image}@{name}", pool.name())));
        }
        SnapCommand::Protect { .. } => pool.snap_set_protected(&image, &name, true)?,
        SnapCommand::Unprotect { .. } => pool.snap_set_protected(&image, &name, false)?,
        SnapCommand::Ls { .. } => {}
    }
    Ok(())
}

fn du(opts: &LocalPoolArgs, pool: &Pool, images: &[String]) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut prov = 0;
    for image in images {
        let r = pool.du(image)?;
        // An image's provisioned size counts once; snapshots add what they allocate.
        prov += r.last().map_or(0, |r| r.provisioned_size);
        rows.extend(r);
    }
    let used: u64 = rows.iter().map(|r| r.used_size).sum();
    if opts.json() {
        return print_json(&json!({"images": rows, "total_provisioned_size": prov,
                                  "total_used_size": used}));
    }
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(7);
    println!("{:<w$}  {:>12}  {:>12}", "NAME", "PROVISIONED", "USED");
    for r in &rows {
        println!(
            "{:<w$}  {:>12}  {:>12}",
            r.name,
            human(r.provisioned_size),
            human(r.used_size)
        );
    }
    if rows.len() > 1 {
        println!(
            "{:<w$}  {:>12}  {:>12}",
            "<TOTAL>",
            human(prov),
            human(used)
        );
    }
    Ok(())
}

/// A duplicate of standard input/output as a [`File`] when it is a regular file that can
/// be read/written at offsets (not in append mode, and for output empty at offset 0).
fn std_as_file(fd: std::os::fd::BorrowedFd<'_>, output: bool) -> Option<File> {
    let f = File::from(fd.try_clone_to_owned().ok()?);
    let m = f.metadata().ok()?;
    if !m.file_type().is_file() {
        return None;
    }
    if output {
        // SAFETY: fcntl/lseek on a descriptor we own.
        let (fl, pos) = unsafe {
            (
                libc::fcntl(f.as_raw_fd(), libc::F_GETFL),
                libc::lseek(f.as_raw_fd(), 0, libc::SEEK_CUR),
            )
        };
        if fl < 0 || fl & libc::O_APPEND != 0 || pos != 0 || m.len() != 0 {
            return None;
        }
    }
    Some(f)
}

fn import(root: &PoolRoot, file: &Path, spec: &str, no_progress: bool) -> anyhow::Result<()> {
    let (pool, s) = parse(root, spec)?;
    if s.snap.is_some() {
        bail!("{spec}: cannot import into a snapshot");
    }
    let stdin = file == Path::new("-");
    let f = if stdin {
        std_as_file(std::io::stdin().as_fd(), false)
    } else {
        Some(File::open(file).with_context(|| format!("opening {}", file.display()))?)
    };
    let total = f
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map_or(0, |m| m.len());
    let mut pr = Progress::new("Importing image", total, !no_progress);
    let size = match &f {
        Some(f) => pool.import(&s.image, ImportSource::File(f), &mut |d| pr.update(d))?,
        None => {
            let mut r = std::io::stdin().lock();
            pool.import(&s.image, ImportSource::Stream(&mut r), &mut |d| {
                pr.update(d)
            })?
        }
    };
    pr.done(Some(&format!(
        "{} to {PREFIX}{}/{}",
        human(size),
        pool.name(),
        s.image
    )));
    Ok(())
}

fn export(root: &PoolRoot, spec: &str, file: &Path, no_progress: bool) -> anyhow::Result<()> {
    let (pool, s) = parse(root, spec)?;
    let size = match &s.snap {
        None => pool.info(&s.image)?.size,
        Some(sn) => {
            pool.snap_list(&s.image)?
                .into_iter()
                .find(|x| &x.name == sn)
                .ok_or_else(|| anyhow!("snapshot {spec} does not exist"))?
                .size
        }
    };
    let stdout = file == Path::new("-");
    let f = if stdout {
        std_as_file(std::io::stdout().as_fd(), true)
    } else {
        Some(File::create(file).with_context(|| format!("creating {}", file.display()))?)
    };
    let mut pr = Progress::new("Exporting image", size, !no_progress);
    let snap = s.snap.as_deref();
    let n = match &f {
        Some(f) => pool.export(&s.image, snap, ExportDest::File(f), &mut |d| pr.update(d))?,
        None => {
            let mut w = std::io::stdout().lock();
            pool.export(&s.image, snap, ExportDest::Stream(&mut w), &mut |d| {
                pr.update(d)
            })?
        }
    };
    pr.done(Some(&format!("{} from {PREFIX}{spec}", human(n))));
    Ok(())
}

/// Runs a `pool` subcommand on the local pools or Ceph.
pub fn run_pool(opts: &LocalPoolArgs, cmd: PoolCommand) -> anyhow::Result<()> {
    let root = opts.root();
    match &cmd {
        PoolCommand::Create { name, .. } | PoolCommand::Init { name, .. } => {
            let Some(name) = opts.local(name) else {
                return super::pool::run(cmd);
            };
            if matches!(cmd, PoolCommand::Create { .. }) {
                root.create_pool(name)?;
            } else {
                // Nothing to initialize: check that it exists.
                root.pool(name)?;
            }
        }
        PoolCommand::Ls { .. } => {
            if !opts.local {
                return super::pool::run(cmd);
            }
            let pools = root.list_pools()?;
            if matches!(&cmd, PoolCommand::Ls { ceph, .. } if ceph.json()) {
                print_json(&pools)?;
            } else {
                pools.iter().for_each(|p| println!("{p}"));
            }
        }
        PoolCommand::Rm {
            name,
            yes_i_really_mean_it,
            ..
        } => {
            let Some(name) = opts.local(name) else {
                return super::pool::run(cmd);
            };
            if !yes_i_really_mean_it {
                bail!("deleting pool {PREFIX}{name} destroys its data: add --yes-i-really-mean-it");
            }
            root.remove_pool(name)?;
        }
    }
    Ok(())
}
