//! One vhost-user connection (a "session" in SPDK's terms): the frontend's view of the
//! device, as set up by the messages of QEMU's docs/interop/vhost-user.rst.
//!
//! The session owns guest memory mappings and ring addresses; when a ring is complete it
//! places the ring's poller on the least-loaded reactor of the controller's cpumask. Ring
//! stops (GET_VRING_BASE, disconnect) wait until the poller has finished every request it
//! took, so that no completion writes into memory the frontend has taken back.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use super::coalescing::Coalescing;
use super::device::{GuestMem, QueueSetup, VirtioDevice};
use super::dirty_log::{DirtyLog, LogRegion};
use super::guest_fault::GuestMapping;
use super::inflight::{part_len as inflight_part_len, InflightRegion};
use super::packed_ring::VIRTIO_F_RING_PACKED;
use super::queue_stats::{QueueCounts, QueueStats};
use super::ConfigNotifier;
use crate::cpumask::CpuMask;
use crate::reactor::{PollerId, Reactors};

/// How long a ring stop waits for in-flight requests before giving up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Most memory regions a frontend may add (vhost-user CONFIGURE_MEM_SLOTS).
const MAX_MEM_SLOTS: u64 = 509;

/// A region of frontend virtual addresses, to translate ring addresses (which the frontend
/// gives in its own address space) to guest physical addresses.
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

#[derive(Default)]
struct Vring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    addr_set: bool,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    /// Where to log the used ring's writes (`VHOST_VRING_F_LOG` with `log_guest_addr`).
    log_addr: Option<u64>,
    /// The ring's counters, across restarts within the session.
    stats: Arc<QueueStats>,
    running: Option<RunningRing>,
}

struct RunningRing {
    core: usize,
    poller: PollerId,
    stopped: mpsc::Receiver<u16>,
    /// The poller was asked to stop taking chains.
    stop_requested: bool,
}

/// The state of one frontend connection.
pub struct Session {
    ctrlr: String,
    device: Arc<dyn VirtioDevice>,
    reactors: Arc<Reactors>,
    cpumask: CpuMask,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    mem: GuestMem,
    mappings: Vec<AddrMapping>,
    /// Every guest memory region this session mapped, current or still used by a ring
    /// after the frontend replaced it; unmapped once nobody else holds the region.
    guest_mappings: Vec<(Arc<GuestRegionMmap>, GuestMapping)>,
    vrings: Vec<Vring>,
    notifier: ConfigNotifier,
    coalescing: Arc<Coalescing>,
    /// The in-flight region (GET_INFLIGHT_FD / SET_INFLIGHT_FD), whose parts the request
    /// queues record their chains in.
    inflight: Option<Arc<InflightRegion>>,
    /// The daemon is stopping: rings stay stopped whatever the frontend sends.
    closing: bool,
    /// Dirty-page logging for a live migration (SET_LOG_BASE, `VHOST_F_LOG_ALL`).
    dirty_log: Arc<DirtyLog>,
}

fn invalid(what: &'static str) -> VuError {
    VuError::InvalidOperation(what)
}

fn req_err(e: impl std::fmt::Display) -> VuError {
    VuError::ReqHandlerError(io::Error::other(e.to_string()))
}

impl Session {
    /// A fresh session for controller `ctrlr`.
    pub fn new(
        ctrlr: &str,
        device: Arc<dyn VirtioDevice>,
        reactors: Arc<Reactors>,
        cpumask: CpuMask,
        notifier: ConfigNotifier,
        coalescing: Arc<Coalescing>,
    ) -> Self {
        let n = device.num_queues();
        Session {
            ctrlr: ctrlr.to_string(),
            device,
            reactors,
            cpumask,
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            mem: GuestMem::new(GuestMemoryMmap::new()),
            mappings: Vec::new(),
            guest_mappings: Vec::new(),
            vrings: (0..n).map(|_| Vring::default()).collect(),
            notifier,
            coalescing,
            inflight: None,
            closing: false,
            dirty_log: Arc::default(),
        }
    }

    /// Whether the frontend has dirty-page logging on (a live migration is copying the
    /// guest's memory).
    pub fn dirty_logging(&self) -> bool {
        self.dirty_log.active()
    }

    /// Applies a change of the dirty-log settings before the frontend hears back: every
    /// reactor running one of this session's rings finishes its current poll pass, so
    /// each later pass follows the new settings, and none can write a page the frontend
    /// then believes logged without logging it (nor mark a bitmap it has taken back).
    fn log_barrier(&self) {
        for core in self.cores() {
            self.reactors.call(core, |_| ());
        }
    }

    /// Requests the session's rings have in flight now.
    pub fn in_flight(&self) -> usize {
        self.vrings
            .iter()
            .filter(|v| v.running.is_some())
            .map(|v| v.stats.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// The counters of every ring the frontend has used (set a size for), by index.
    pub fn queue_counts(&self) -> Vec<(usize, QueueCounts)> {
        self.vrings
            .iter()
            .enumerate()
            .filter(|(_, v)| v.size > 0)
            .map(|(i, v)| (i, v.stats.snapshot()))
            .collect()
    }

    /// Number of rings running on reactors.
    pub fn running_rings(&self) -> usize {
        self.vrings.iter().filter(|v| v.running.is_some()).count()
    }

    /// Reactor cores this session's rings run on.
    pub fn cores(&self) -> Vec<usize> {
        let mut c: Vec<usize> = self
            .vrings
            .iter()
            .filter_map(|v| v.running.as_ref().map(|r| r.core))
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)
    }

    fn vmm_va_to_gpa(&self, va: u64) -> VuResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa_base)
            .ok_or_else(|| req_err(format!("ring address {va:#x} is outside guest memory")))
    }

    /// Whether the rings are packed (VIRTIO_F_RING_PACKED acked): the in-flight region
    /// then has the packed layout. The front-end sets the features before it asks for the
    /// region or hands it back (QEMU's `vhost_dev_prepare_inflight`).
    fn packed_rings(&self) -> bool {
        self.acked_features & (1 << VIRTIO_F_RING_PACKED) != 0
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Starts ring `index` on a reactor when it is complete: addresses, kick fd, and enabled
    /// (rings start enabled when PROTOCOL_FEATURES was not negotiated, vhost-user.rst
    /// "Ring states").
    fn maybe_start(&mut self, index: usize) -> VuResult<()> {
        let enabled_by_default = !self.protocol_features_acked();
        let features = self.acked_features;
        let v = &self.vrings[index];
        if self.closing || v.running.is_some() || !v.addr_set || v.kick.is_none() {
            return Ok(());
        }
        if !(v.enabled || enabled_by_default) {
            return Ok(());
        }
        let mut queue = Queue::new(self.device.max_queue_size()).map_err(req_err)?;
        queue.set_size(v.size);
        queue
            .try_set_desc_table_address(GuestAddress(v.desc))
            .map_err(req_err)?;
        queue
            .try_set_avail_ring_address(GuestAddress(v.avail))
            .map_err(req_err)?;
        queue
            .try_set_used_ring_address(GuestAddress(v.used))
            .map_err(req_err)?;
        queue.set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        queue.set_next_avail(v.base);
        let mem = self.mem.memory();
        // A packed ring (virtio 1.2 §2.8) is checked by the ring itself: virtio-queue
        // knows only the split layout.
        let packed = features & (1 << VIRTIO_F_RING_PACKED) != 0;
        // The used index continues from where the frontend's ring is (e.g. after a
        // reconnect), virtio 1.2 §2.7.8.
        if !packed {
            let used = queue
                .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                .map_err(req_err)?;
            queue.set_next_used(used.0);
        }
        queue.set_ready(true);
        if !packed && !queue.is_valid(&*mem) {
            return Err(req_err(format!(
                "controller {}: ring {index} does not fit in guest memory",
                self.ctrlr
            )));
        }
        let kick = dup_eventfd(v.kick.as_ref())?.ok_or(VuError::InvalidParam)?;
        let call = dup_eventfd(v.call.as_ref())?;
        let (tx, rx) = mpsc::channel();
        let tracked =
            self.acked_protocol_features & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() != 0;
        let inflight = match &self.inflight {
            Some(r) if tracked => r.queue(index as u16),
            _ => None,
        };
        let setup = QueueSetup {
            index: index as u16,
            queue,
            mem: self.mem.clone(),
            kick,
            call,
            stopped: tx,
            coalescing: self.coalescing.clone(),
            inflight,
            stats: v.stats.clone(),
            log: self.dirty_log.ring(index as u16),
            packed,
        };
        let core = self.reactors.pick(&self.cpumask).ok_or_else(|| {
            req_err(format!(
                "controller {}: no reactor in cpumask {}",
                self.ctrlr, self.cpumask
            ))
        })?;
        // The device's first ring: its bdevs start I/O (a migration's destination takes the
        // write role and drops stale caches here); a refusal refuses the ring.
        let first = self.running_rings() == 0;
        if first {
            if let Err(e) = self.device.activate() {
                tracing::error!(ctrlr = %self.ctrlr, ring = index, "device not started: {e}");
                return Err(VuError::ReqHandlerError(e));
            }
        }
        let device = self.device.clone();
        let name = format!("{}.q{index}", self.ctrlr);
        let started = self
            .reactors
            .call(core, move |ctx| {
                let poller = device.start_queue(ctx, setup, features)?;
                Ok::<_, io::Error>(ctx.add_poller(&name, poller))
            })
            .ok_or_else(|| req_err("reactor is gone"))
            .and_then(|r| r.map_err(VuError::ReqHandlerError));
        let started = match started {
            Ok(p) => p,
            Err(e) => {
                if first {
                    self.device.deactivate();
                }
                return Err(e);
            }
        };
        tracing::debug!(ctrlr = %self.ctrlr, ring = index, core, "ring started");
        self.vrings[index].running = Some(RunningRing {
            core,
            poller: started,
            stopped: rx,
            stop_requested: false,
        });
        Ok(())
    }

    /// Asks ring `index`, if it runs, to stop taking chains; it finishes what it took.
    fn request_stop(&mut self, index: usize) {
        if let Some(r) = &mut self.vrings[index].running {
            if !std::mem::replace(&mut r.stop_requested, true) {
                let poller = r.poller;
                self.reactors
                    .run(r.core, move |ctx| ctx.stop_poller(poller));
            }
        }
    }

    /// Stops ring `index` if it runs, waiting until its in-flight requests are done;
    /// returns the next available index to resume from. When it was the device's last
    /// running ring, the device is deactivated before this returns, i.e. before
    /// GET_VRING_BASE is answered: a migration's source has every completed write durable
    /// (and the write role handed over) before the destination runs.
    fn stop_ring(&mut self, index: usize) -> u16 {
        self.request_stop(index);
        let Some(r) = self.vrings[index].running.take() else {
            return self.vrings[index].base;
        };
        let (next, finished) = match r.stopped.recv_timeout(STOP_TIMEOUT) {
            Ok(next_avail) => {
                self.vrings[index].base = next_avail;
                (next_avail, true)
            }
            Err(_) => {
                tracing::error!(
                    ctrlr = %self.ctrlr,
                    ring = index,
                    "ring did not finish its requests in {STOP_TIMEOUT:?}; abandoning them"
                );
                (self.vrings[index].base, false)
            }
        };
        if self.running_rings() == 0 {
            if finished {
                self.device.deactivate();
            } else {
                // Writes may still land: never hand the storage over under them.
                tracing::error!(ctrlr = %self.ctrlr, "device not deactivated: requests abandoned");
            }
        }
        next
    }

    /// Whether the frontend shrank a region's file under a mapping (see [`guest_fault`]):
    /// the session then serves zeros instead of guest memory and must be closed.
    ///
    /// [`guest_fault`]: super::guest_fault
    pub fn memory_broken(&self) -> bool {
        self.guest_mappings.iter().any(|(_, m)| m.is_broken())
    }

    /// Unmaps the regions neither the memory table nor a ring holds any more.
    fn unmap_unused(&mut self) {
        self.guest_mappings
            .retain(|(r, _)| Arc::strong_count(r) > 1);
    }

    /// Stops every ring (frontend gone, controller deleted, daemon stopping): all stop
    /// taking chains at once, then each is waited for.
    pub fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.request_stop(i);
        }
        for i in 0..self.vrings.len() {
            self.stop_ring(i);
        }
    }

    /// The daemon is stopping: every ring stops taking chains, and they stay stopped
    /// whatever the frontend sends (the connection stays open until the session goes).
    /// [`Session::stop_all`] then waits until each has finished, published and signalled
    /// what it took, so that the frontend sees every completion before the disconnection.
    pub fn begin_quiesce(&mut self) {
        self.closing = true;
        for i in 0..self.vrings.len() {
            self.request_stop(i);
        }
    }

    /// Refuses a region geometry beyond what the device offers (queues, ring size): the
    /// region's size follows from it.
    fn check_inflight_geometry(&self, inflight: &VhostUserInflight) -> VuResult<()> {
        if usize::from(inflight.num_queues) > self.device.num_queues()
            || inflight.queue_size > self.device.max_queue_size()
        {
            tracing::warn!(ctrlr = %self.ctrlr, queues = inflight.num_queues,
                           queue_size = inflight.queue_size,
                           "in-flight region larger than the device's queues: refused");
            return Err(VuError::InvalidParam);
        }
        Ok(())
    }
}

/// Refuses a memory region that its fd cannot back.
///
/// Touching a shared mapping past the end of its file raises SIGBUS in whichever thread
/// touches it (mmap(2)), so a frontend that declares a region larger than its fd could kill
/// the whole daemon. vhost-user.rst passes guest memory as memfds, hugetlbfs or shm files:
/// all regular files, whose size fstat reports, and `mmap_offset + memory_size` must lie
/// within it. Other fd types (devices, pipes, sockets) report no usable size and are refused.
fn check_region_fd(file: &File, mmap_offset: u64, memory_size: u64) -> VuResult<()> {
    let md = file.metadata().map_err(VuError::ReqHandlerError)?;
    if !md.file_type().is_file() {
        return Err(req_err(
            "memory region fd is not a regular file, memfd or hugetlbfs file",
        ));
    }
    let end = mmap_offset.checked_add(memory_size);
    if memory_size == 0 || end.is_none_or(|end| end > md.len()) {
        return Err(req_err(format!(
            "memory region of {memory_size:#x} bytes at file offset {mmap_offset:#x} does not \
             fit in its fd of {:#x} bytes",
            md.len()
        )));
    }
    Ok(())
}

/// Maps one region the frontend declared (checked against its fd) as a registered
/// [`GuestMapping`], and the vm-memory region over it (which does not own the mapping).
fn map_region(
    file: &File,
    gpa: u64,
    size: u64,
    offset: u64,
) -> VuResult<(Arc<GuestRegionMmap>, GuestMapping)> {
    check_region_fd(file, offset, size)?;
    let m = GuestMapping::map(file, offset, size).map_err(VuError::ReqHandlerError)?;
    let len = usize::try_from(size).map_err(|_| VuError::InvalidParam)?;
    // SAFETY: `m` maps `len` bytes at this page-aligned address; the session keeps `m`
    // until no table or ring holds the region (see `unmap_unused`).
    let region = unsafe { MmapRegionBuilder::<()>::new(len).with_raw_mmap_pointer(m.addr()) }
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .map_err(req_err)?;
    let r = GuestRegionMmap::new(region, GuestAddress(gpa)).ok_or(VuError::InvalidParam)?;
    Ok((Arc::new(r), m))
}

/// Duplicates an eventfd received from the frontend and makes it non-blocking, so a
/// reactor draining it never blocks.
fn dup_eventfd(f: Option<&File>) -> VuResult<Option<EventFd>> {
    let Some(f) = f else { return Ok(None) };
    let dup = f.try_clone().map_err(VuError::ReqHandlerError)?;
    let fd = dup.into_raw_fd();
    // SAFETY: fd is a valid descriptor we own; F_SETFL only changes its status flags.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        // SAFETY: fd is owned and becomes owned by the EventFd.
        Ok(Some(EventFd::from_raw_fd(fd)))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop_all();
        // Release the memory table, then every mapping nobody else holds; one a ring that
        // was abandoned (see `stop_ring`) may still use stays mapped for good.
        let _ = self.mem.replace(GuestMemoryMmap::new());
        self.unmap_unused();
        for (r, m) in self.guest_mappings.drain(..) {
            std::mem::forget(r);
            std::mem::forget(m);
        }
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(invalid("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.stop_all();
        self.dirty_log.clear();
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_all();
        for v in &mut self.vrings {
            *v = Vring::default();
        }
        self.acked_features = 0;
        self.inflight = None;
        self.dirty_log.clear();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.device.features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.device.features() != 0 {
            return Err(VuError::InvalidParam);
        }
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        let logging_changed = (features ^ self.acked_features) & log_all != 0;
        self.acked_features = features;
        self.device.features_acked(features);
        if logging_changed {
            // vhost-user.rst "Migration": LOG_ALL on while the rings run starts the log
            // of every write into guest memory; off ends it (done, or migrate_cancel).
            let on = features & log_all != 0;
            tracing::info!(ctrlr = %self.ctrlr, on, "dirty-page logging");
            self.dirty_log.set_log_all(on);
            self.log_barrier();
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(invalid("postcopy is not supported"));
        }
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        let mut owned = Vec::new();
        if ctx.len() != files.len() {
            return Err(VuError::InvalidParam);
        }
        for (region, file) in ctx.iter().zip(files) {
            let (r, m) = map_region(
                &file,
                region.guest_phys_addr,
                region.memory_size,
                region.mmap_offset,
            )?;
            owned.push((r.clone(), m));
            mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
            regions.push(r);
        }
        let mem = GuestMemoryMmap::from_arc_regions(regions).map_err(req_err)?;
        self.mem.replace(mem).map_err(req_err)?;
        self.mappings = mappings;
        self.guest_mappings.extend(owned);
        self.unmap_unused();
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = self.device.max_queue_size() as u32;
        let v = self.vring(index)?;
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        v.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let used = self.vmm_va_to_gpa(used)?;
        let avail = self.vmm_va_to_gpa(available)?;
        // vhost-user.rst "Migration": with VHOST_VRING_F_LOG the used ring's writes are
        // logged at `log` (a guest physical address). QEMU sends this again to running
        // rings when logging starts and stops: the running ring follows it, the addresses
        // it runs on stay (the frontend cannot move a running ring).
        let log_addr = flags
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(log);
        let v = self.vring(index)?;
        v.desc = desc;
        v.used = used;
        v.avail = avail;
        v.addr_set = true;
        let changed = std::mem::replace(&mut v.log_addr, log_addr) != log_addr;
        let running = v.running.is_some();
        if changed {
            self.dirty_log.set_used(index as u16, log_addr);
            if running {
                self.log_barrier();
            }
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let v = self.vring(index)?;
        v.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let next_avail = self.stop_ring(index as usize);
        let v = &mut self.vrings[index as usize];
        v.kick = None;
        v.call = None;
        Ok(VhostUserVringState::new(index, next_avail as u32))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let running = self.vring(index as u32)?.running.is_some();
        if running {
            // A new kick fd for a running ring: restart it with the new fd.
            self.stop_ring(index as usize);
        }
        self.vring(index as u32)?.kick = fd;
        self.maybe_start(index as usize)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let running = self.vring(index as u32)?.running.is_some();
        if running {
            self.stop_ring(index as usize);
        }
        self.vring(index as u32)?.call = fd;
        self.maybe_start(index as usize)
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32)?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.device.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.device.num_queues() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if !self.protocol_features_acked() {
            return Err(VuError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.enabled = enable;
        if enable {
            self.maybe_start(index as usize)
        } else {
            self.stop_ring(index as usize);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let cfg = self.device.config_space();
        let start = offset as usize;
        let end = start
            .checked_add(size as usize)
            .ok_or(VuError::InvalidParam)?;
        if end > cfg.len() {
            return Err(VuError::InvalidParam);
        }
        Ok(cfg[start..end].to_vec())
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        self.device
            .write_config(offset, buf)
            .map_err(VuError::ReqHandlerError)
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        if self.acked_protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0 {
            backend.set_reply_ack_flag(true);
        }
        self.notifier.set(Some(backend));
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(invalid("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(invalid("shared objects are not supported"))
    }

    /// A new zeroed region for the frontend to keep (and hand back on every start); the
    /// rings use the one of SET_INFLIGHT_FD, which the frontend sends next.
    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        self.check_inflight_geometry(inflight)?;
        let (region, file, msg) = InflightRegion::create(
            inflight.num_queues,
            inflight.queue_size,
            self.packed_rings(),
        )
        .map_err(|e| {
            tracing::warn!(ctrlr = %self.ctrlr, "GET_INFLIGHT_FD: {e}");
            VuError::ReqHandlerError(e)
        })?;
        tracing::debug!(ctrlr = %self.ctrlr, queues = msg.num_queues, queue_size = msg.queue_size,
                        bytes = msg.mmap_size, "in-flight region created");
        self.inflight = Some(region);
        Ok((msg, file))
    }

    /// The region the frontend keeps (from this instance or a previous one): request
    /// queues started from now on track their chains in it and resume from it.
    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        self.check_inflight_geometry(inflight)?;
        let packed = self.packed_rings();
        let packed_len =
            inflight_part_len(inflight.queue_size, true) * u64::from(inflight.num_queues);
        let region = match InflightRegion::open(&file, inflight, packed) {
            // A region sized for split rings (made before the packed layout was, by an
            // older blockd): the packed rings run untracked, as they did then.
            Err(e) if packed && inflight.mmap_size < packed_len => {
                tracing::warn!(ctrlr = %self.ctrlr,
                               "in-flight region too small for packed rings ({e}): not tracked");
                InflightRegion::open(&file, inflight, false)
            }
            r => r,
        }
        .map_err(|e| {
            tracing::warn!(ctrlr = %self.ctrlr, "SET_INFLIGHT_FD refused: {e}");
            VuError::ReqHandlerError(e)
        })?;
        tracing::debug!(ctrlr = %self.ctrlr, queues = inflight.num_queues,
                        queue_size = inflight.queue_size, "in-flight region set");
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(invalid("postcopy is not supported"));
        }
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(VuError::InvalidParam);
        }
        let (r, m) = map_region(
            &file,
            region.guest_phys_addr,
            region.memory_size,
            region.mmap_offset,
        )?;
        let mem = self
            .mem
            .memory()
            .insert_region(r.clone())
            .map_err(req_err)?;
        self.mem.replace(mem).map_err(req_err)?;
        self.guest_mappings.push((r, m));
        self.mappings.push(AddrMapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(req_err)?;
        self.mem.replace(mem).map_err(req_err)?;
        self.mappings
            .retain(|m| m.gpa_base != region.guest_phys_addr);
        self.unmap_unused();
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(invalid("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(invalid("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(invalid("shared memory regions are not supported"))
    }

    /// vhost-user.rst "VHOST_USER_SET_LOG_BASE" with LOG_SHMFD: the bitmap is `mmap_size`
    /// bytes of the fd from `mmap_offset`, checked against the fd's size like a memory
    /// region; it replaces an earlier one (QEMU sends a larger log when guest memory
    /// grows). The reply (the same body) is sent by the vhost crate once this returns,
    /// after the barrier: from then on no ring marks the old bitmap.
    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        check_region_fd(&file, log.mmap_offset, log.mmap_size)?;
        let region = LogRegion::map(&file, log.mmap_size, log.mmap_offset).map_err(|e| {
            req_err(format!(
                "controller {}: cannot map the dirty log: {e}",
                self.ctrlr
            ))
        })?;
        tracing::info!(ctrlr = %self.ctrlr, bytes = log.mmap_size, "dirty log set");
        self.dirty_log.set_region(Some(region));
        self.log_barrier();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;
    use crate::bdev::malloc::{self, MallocOpts};
    use crate::bdev::BdevRegistry;
    use crate::reactor::PollOptions;
    use crate::vhost::blk::BlkDevice;
    use crate::vhost::guest_fault;

    fn memfd(len: u64) -> File {
        // SAFETY: a NUL-terminated name; returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new fd nobody else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    /// Found by the fuzz target `vhost_session`: a ring answered its stop before its queue
    /// had let go of guest memory, so a session dropped right after (disconnection) found
    /// the regions still held and kept them mapped for good, a leak of the guest's memory
    /// (and of a guest-fault slot) per reconnection.
    #[test]
    fn a_closed_session_unmaps_guest_memory_its_rings_used() {
        let r = BdevRegistry::default();
        let opts = MallocOpts {
            name: Some("M".into()),
            uuid: None,
            num_blocks: 64,
            block_size: 512,
        };
        let bdev = malloc::create(&r, opts).unwrap();
        let device: Arc<dyn VirtioDevice> =
            Arc::new(BlkDevice::new("c", bdev, false, ConfigNotifier::default()));
        let mask = CpuMask::parse("0x1").unwrap();
        let reactors = Arc::new(Reactors::start(&mask, PollOptions::default()).unwrap());
        const UADDR: u64 = 0x7f00_0000_0000;
        for _ in 0..20 {
            let mut s = Session::new(
                "c",
                device.clone(),
                reactors.clone(),
                mask.clone(),
                ConfigNotifier::default(),
                Arc::default(),
            );
            s.set_features(device.features() & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
                .unwrap();
            let region = VhostUserMemoryRegion::new(0, 1 << 16, UADDR, 0);
            s.set_mem_table(&[region], vec![memfd(1 << 16)], None)
                .unwrap();
            s.set_vring_num(0, 16).unwrap();
            s.set_vring_addr(
                0,
                VhostUserVringAddrFlags::empty(),
                UADDR,
                UADDR + 0x2000,
                UADDR + 0x1000,
                0,
            )
            .unwrap();
            // SAFETY: eventfd(2) returns a new fd or -1.
            let kick = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            assert!(kick >= 0);
            // SAFETY: a new fd nobody else owns.
            s.set_vring_kick(0, Some(unsafe { File::from_raw_fd(kick) }))
                .unwrap();
            assert_eq!(s.running_rings(), 1);
            let addr = s.guest_mappings[0].1.addr();
            drop(s);
            assert!(
                !guest_fault::is_registered(addr),
                "the session kept guest memory mapped after it was closed"
            );
        }
        reactors.shutdown();
    }
}
