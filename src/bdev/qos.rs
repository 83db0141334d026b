//! QoS limits (`bdev_set_qos_limit`). (being written)

use serde_json::{json, Value};

/// Limits; 0 = unlimited.
#[derive(Default, Clone, Copy, Debug)]
pub struct QosLimits {
    pub rw_ios_per_sec: u64,
    pub rw_mbytes_per_sec: u64,
    pub r_mbytes_per_sec: u64,
    pub w_mbytes_per_sec: u64,
}

impl QosLimits {
    /// `assigned_rate_limits` of `bdev_get_bdevs`.
    pub fn to_json(&self) -> Value {
        json!({"rw_ios_per_sec": self.rw_ios_per_sec, "rw_mbytes_per_sec": self.rw_mbytes_per_sec,
               "r_mbytes_per_sec": self.r_mbytes_per_sec, "w_mbytes_per_sec": self.w_mbytes_per_sec})
    }
}

/// A bdev's QoS state.
#[derive(Default)]
pub struct Qos {}

impl Qos {
    pub fn limits(&self) -> QosLimits {
        QosLimits::default()
    }
}
