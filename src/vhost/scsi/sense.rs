//! SCSI status and fixed-format sense data (SPC-4 §4.5.3).
//!
//! Every error blockd reports to an initiator is a CHECK CONDITION with fixed-format sense
//! (response code 0x70, current error), built here from a [`Sense`] triple.

/// SAM-5 status: GOOD.
pub const GOOD: u8 = 0x00;
/// SAM-5 status: CHECK CONDITION (sense data follows).
pub const CHECK_CONDITION: u8 = 0x02;

/// Length of the fixed-format sense data blockd returns (SPC-4 §4.5.3: 18 bytes with an
/// additional sense length of 10).
pub const FIXED_SENSE_LEN: usize = 18;

/// Sense keys (SPC-4 Table 48).
pub mod key {
    /// NO SENSE.
    pub const NO_SENSE: u8 = 0x0;
    /// MEDIUM ERROR: unrecoverable error on the medium (backend I/O failure).
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// HARDWARE ERROR.
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// ILLEGAL REQUEST: the CDB or parameter list is wrong.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// DATA PROTECT: a write to a write-protected medium.
    pub const DATA_PROTECT: u8 = 0x7;
    /// ABORTED COMMAND.
    pub const ABORTED_COMMAND: u8 = 0xB;
}

/// A sense key with its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// Sense key (SPC-4 Table 48).
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }

    /// The fixed-format sense data (SPC-4 §4.5.3): response code 0x70 (current), the key in
    /// byte 2, additional length 10, ASC/ASCQ in bytes 12/13.
    pub fn fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut s = [0u8; FIXED_SENSE_LEN];
        s[0] = 0x70;
        s[2] = self.key & 0x0f;
        s[7] = (FIXED_SENSE_LEN - 8) as u8;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}

/// NO SENSE, NO ADDITIONAL SENSE INFORMATION (REQUEST SENSE without a pending condition).
pub const NO_SENSE: Sense = Sense::new(key::NO_SENSE, 0x00, 0x00);
/// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (0x20/0x00).
pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
/// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (0x21/0x00).
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
/// ILLEGAL REQUEST, INVALID FIELD IN CDB (0x24/0x00).
pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
/// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (0x25/0x00).
pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
/// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (0x26/0x00).
pub const INVALID_FIELD_IN_PARAM_LIST: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
/// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR (0x1A/0x00).
pub const PARAM_LIST_LENGTH_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1A, 0x00);
/// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED (0x39/0x00).
pub const SAVING_PARAMS_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
/// MEDIUM ERROR, UNRECOVERED READ ERROR (0x11/0x00).
pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
/// MEDIUM ERROR, WRITE ERROR (0x0C/0x00).
pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00);
/// DATA PROTECT, WRITE PROTECTED (0x27/0x00): SBC-4 §4.10, a write to a read-only LUN.
pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
/// ABORTED COMMAND, no additional sense (request dropped because its LUN went away).
pub const ABORTED: Sense = Sense::new(key::ABORTED_COMMAND, 0x00, 0x00);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_bytes() {
        assert_eq!(
            INVALID_OPCODE.fixed(),
            [0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0x00, 0, 0, 0, 0]
        );
        assert_eq!(
            WRITE_ERROR.fixed(),
            [0x70, 0, 0x03, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x0C, 0x00, 0, 0, 0, 0]
        );
    }
}
