//! CMOS RAM and real-time clock (MC146818) at ports 0x70 (index) and 0x71
//! (data): enough for the guest to read and set its wall clock.
//!
//! Time is the host's UTC plus an offset the guest may change by writing
//! the time registers. The update-in-progress bit never reads as set, so a
//! guest polling for it never waits.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::PioDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const REG_A_UIP: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz periodic rate: what firmware programs.
const REG_A_DEFAULT: u8 = 0x26;
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
const REG_B_HOUR_PM: u8 = 0x80;
/// "Valid RAM and time": the battery is fine.
const REG_D_VRT: u8 = 0x80;
const INDEX_MASK: u8 = 0x7f; // bit 7 of the index port masks NMIs

/// Broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// Guest clock minus host clock, in seconds.
    offset_secs: i64,
    now: fn() -> i64,
}

fn host_unix_time() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(host_unix_time)
    }
}

impl Cmos {
    pub const LEN: u16 = 2;

    pub fn new() -> Self {
        Self::default()
    }

    fn with_clock(now: fn() -> i64) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A as usize] = REG_A_DEFAULT;
        ram[REG_B as usize] = REG_B_24H;
        Cmos {
            index: 0,
            ram,
            offset_secs: 0,
            now,
        }
    }

    fn guest_time(&self) -> DateTime {
        from_unix((self.now)() + self.offset_secs)
    }

    fn binary_mode(&self) -> bool {
        self.ram[REG_B as usize] & REG_B_BINARY != 0
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.binary_mode() {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.binary_mode() {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        }
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.ram[REG_B as usize] & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { REG_B_HOUR_PM } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u32 {
        if self.ram[REG_B as usize] & REG_B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & !REG_B_HOUR_PM) % 12;
        if v & REG_B_HOUR_PM != 0 {
            h12 + 12
        } else {
            h12
        }
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        let t = self.guest_time();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(weekday(t) + 1),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u32),
            REG_CENTURY => self.encode(t.year.div_euclid(100) as u32),
            REG_A => self.ram[REG_A as usize] & !REG_A_UIP,
            REG_C => 0, // no interrupt flags: we raise no RTC interrupts
            REG_D => REG_D_VRT,
            r => self.ram[r as usize],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        let mut t = self.guest_time();
        let field_value = self.decode(value);
        match reg {
            REG_SECONDS => t.second = field_value.min(59),
            REG_MINUTES => t.minute = field_value.min(59),
            REG_HOURS => t.hour = self.decode_hour(value).min(23),
            REG_DAY => t.day = field_value.clamp(1, 31),
            REG_MONTH => t.month = field_value.clamp(1, 12),
            REG_YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(field_value % 100),
            REG_CENTURY => t.year = i64::from(field_value) * 100 + t.year.rem_euclid(100),
            REG_WEEKDAY => return,   // derived from the date
            REG_C | REG_D => return, // read-only
            r => {
                self.ram[r as usize] = value;
                return;
            }
        }
        self.offset_secs = to_unix(t) - (self.now)();
    }
}

impl PioDevice for Cmos {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 1 {
            let value = self.read_register(self.index);
            if let Some(first) = data.first_mut() {
                *first = value;
            }
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.index = value & INDEX_MASK,
            1 => self.write_register(self.index, value),
            _ => {}
        }
    }
}

/// Days since 1970-01-01 to a civil date (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn from_unix(secs: i64) -> DateTime {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    DateTime {
        year,
        month,
        day,
        hour: rem / 3600,
        minute: rem / 60 % 60,
        second: rem % 60,
    }
}

fn to_unix(t: DateTime) -> i64 {
    days_from_civil(t.year, t.month, t.day) * 86_400
        + i64::from(t.hour * 3600 + t.minute * 60 + t.second)
}

/// 0 = Sunday.
fn weekday(t: DateTime) -> u32 {
    // 1970-01-01 was a Thursday.
    (days_from_civil(t.year, t.month, t.day) + 4).rem_euclid(7) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-23 14:05:09 UTC, a Monday.
    const FIXED: i64 = 1_795_442_709;

    fn cmos() -> Cmos {
        Cmos::with_clock(|| FIXED)
    }

    fn reg(c: &mut Cmos, r: u8) -> u8 {
        c.write(0, &[r]);
        let mut b = [0];
        c.read(1, &mut b);
        b[0]
    }

    fn set(c: &mut Cmos, r: u8, v: u8) {
        c.write(0, &[r]);
        c.write(1, &[v]);
    }

    #[test]
    fn reads_host_time_in_bcd() {
        let mut c = cmos();
        assert_eq!(reg(&mut c, REG_SECONDS), 0x09);
        assert_eq!(reg(&mut c, REG_MINUTES), 0x05);
        assert_eq!(reg(&mut c, REG_HOURS), 0x14);
        assert_eq!(reg(&mut c, REG_DAY), 0x23);
        assert_eq!(reg(&mut c, REG_MONTH), 0x11);
        assert_eq!(reg(&mut c, REG_YEAR), 0x26);
        assert_eq!(reg(&mut c, REG_CENTURY), 0x20);
        assert_eq!(reg(&mut c, REG_WEEKDAY), 2, "Monday is 2 when Sunday is 1");
        assert_eq!(reg(&mut c, REG_D), REG_D_VRT);
        assert_eq!(reg(&mut c, REG_A) & REG_A_UIP, 0);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut c = cmos();
        set(&mut c, REG_B, REG_B_BINARY);
        assert_eq!(reg(&mut c, REG_DAY), 23);
        assert_eq!(reg(&mut c, REG_HOURS), 2 | REG_B_HOUR_PM);
    }

    #[test]
    fn guest_can_set_the_clock() {
        let mut c = cmos();
        set(&mut c, REG_YEAR, 0x30);
        set(&mut c, REG_HOURS, 0x01);
        assert_eq!(reg(&mut c, REG_YEAR), 0x30);
        assert_eq!(reg(&mut c, REG_HOURS), 0x01);
        assert_eq!(reg(&mut c, REG_MONTH), 0x11);
        // Bogus BCD from the guest is clamped, never a panic.
        set(&mut c, REG_MONTH, 0xff);
        set(&mut c, REG_DAY, 0x00);
        assert_eq!(reg(&mut c, REG_MONTH), 0x12);
    }

    #[test]
    fn ram_bytes_round_trip_and_index_masks_nmi_bit() {
        let mut c = cmos();
        set(&mut c, 0x80 | 0x40, 0xab);
        assert_eq!(reg(&mut c, 0x40), 0xab);
    }

    #[test]
    fn calendar_round_trips() {
        for secs in [0, 951_782_400, 1_709_164_800, 4_102_444_800, FIXED, -86_400] {
            assert_eq!(to_unix(from_unix(secs)), secs);
        }
        assert_eq!(from_unix(951_782_400).month, 2); // 2000-02-29
        assert_eq!(from_unix(951_782_400).day, 29);
    }
}
