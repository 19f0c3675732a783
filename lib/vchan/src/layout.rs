//! The shared page of a vchan, as Xen's `libxenvchan.h` defines it, and the
//! choice and validation of ring sizes. Pure: no memory is touched here.
//!
//! ```text
//! offset  field                    written by
//!  0      left.cons   (u32)        server (it reads the left ring)
//!  4      left.prod   (u32)        client (it writes the left ring)
//!  8      right.cons  (u32)        client
//! 12      right.prod  (u32)        server
//! 16      left_order  (u16)        server, at setup
//! 18      right_order (u16)        server, at setup
//! 20      cli_live    (u8)         client (0 gone, 1 connected, 2 not yet)
//! 21      srv_live    (u8)         server
//! 22      cli_notify  (u8)         bits the server wants the client to signal
//! 23      srv_notify  (u8)         bits the client wants the server to signal
//! 24      grants[]    (u32 each)   server: left ring's grants, then right's
//! ```
//!
//! A ring of order 10 lives in the shared page at offset 1024, one of order
//! 11 at offset 2048; a ring of order 12 or more has pages of its own,
//! 2^(order-12) grants each.

use std::fmt;

pub const PAGE_SIZE: usize = 4096;
pub const PAGE_SHIFT: u8 = 12;

pub const LEFT_CONS: usize = 0;
pub const LEFT_PROD: usize = 4;
pub const RIGHT_CONS: usize = 8;
pub const RIGHT_PROD: usize = 12;
pub const LEFT_ORDER: usize = 16;
pub const RIGHT_ORDER: usize = 18;
pub const CLI_LIVE: usize = 20;
pub const SRV_LIVE: usize = 21;
pub const CLI_NOTIFY: usize = 22;
pub const SRV_NOTIFY: usize = 23;
pub const GRANTS: usize = 24;

/// Notify bit: signal when data was written.
pub const NOTIFY_WRITE: u8 = 0x1;
/// Notify bit: signal when data was read (space freed).
pub const NOTIFY_READ: u8 = 0x2;

/// The live byte's values.
pub const LIVE_GONE: u8 = 0;
pub const LIVE_CONNECTED: u8 = 1;
pub const LIVE_WAITING: u8 = 2;

pub const SMALL_ORDER: u8 = 10;
pub const LARGE_ORDER: u8 = 11;
const SMALL_OFFSET: usize = 1024;
const LARGE_OFFSET: usize = 2048;
/// Larger rings would need more grants than the shared page holds.
pub const MAX_ORDER: u8 = 20;
pub const MAX_RING_SIZE: usize = 1 << MAX_ORDER;

/// Where one ring's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Inside the shared page, at this offset.
    InPage(usize),
    /// In pages of its own, this many.
    Pages(usize),
}

/// The two rings' sizes as log2 of their byte count. `left` is the
/// client→server ring, `right` the server→client ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orders {
    pub left: u8,
    pub right: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("requested ring size {0} is over the vchan maximum of {MAX_RING_SIZE} bytes")]
    TooLarge(usize),
    #[error("ring order {order} of the {side} ring is outside {SMALL_ORDER}..={MAX_ORDER}")]
    BadOrder { side: Side, order: u16 },
    #[error("both rings have order {0}, so both would sit at the same place in the shared page")]
    SameInPage(u8),
    #[error(
        "the grant list ({grants} grants) runs into the {side} ring at offset {offset} of the shared page"
    )]
    GrantsOverlap {
        grants: usize,
        side: Side,
        offset: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Left => "left (client to server)",
            Side::Right => "right (server to client)",
        })
    }
}

/// Where a ring of `order` lives.
pub fn placement(order: u8) -> Placement {
    match order {
        SMALL_ORDER => Placement::InPage(SMALL_OFFSET),
        LARGE_ORDER => Placement::InPage(LARGE_OFFSET),
        o => Placement::Pages(1 << (o - PAGE_SHIFT)),
    }
}

fn pages(order: u8) -> usize {
    match placement(order) {
        Placement::InPage(_) => 0,
        Placement::Pages(n) => n,
    }
}

impl Orders {
    /// The orders a server picks for rings of at least `left_min` and
    /// `right_min` bytes: libxenvchan's rule, so a peer sees the same
    /// layout from us as from the C library. Rings fit in the shared page
    /// where they can.
    pub fn for_server(left_min: usize, right_min: usize) -> Result<Orders, LayoutError> {
        for n in [left_min, right_min] {
            if n > MAX_RING_SIZE {
                return Err(LayoutError::TooLarge(n));
            }
        }
        let min_order = |n: usize| {
            let mut o = PAGE_SHIFT;
            while n > 1usize << o {
                o += 1;
            }
            o
        };
        let mut o = Orders {
            left: min_order(left_min),
            right: min_order(right_min),
        };
        let (small, large) = (1usize << SMALL_ORDER, 1usize << LARGE_ORDER);
        if left_min <= small && right_min <= large {
            o = Orders {
                left: SMALL_ORDER,
                right: LARGE_ORDER,
            };
        } else if left_min <= large && right_min <= small {
            o = Orders {
                left: LARGE_ORDER,
                right: SMALL_ORDER,
            };
        } else if left_min <= large {
            o.left = LARGE_ORDER;
        } else if right_min <= large {
            o.right = LARGE_ORDER;
        }
        Ok(o)
    }

    /// Checks orders read from a shared page a peer wrote: each in range,
    /// not both in the same place of the page, and a grant list that ends
    /// before any in-page ring (and within the page).
    pub fn validate(left: u16, right: u16) -> Result<Orders, LayoutError> {
        let check = |side, order: u16| {
            u8::try_from(order)
                .ok()
                .filter(|o| (SMALL_ORDER..=MAX_ORDER).contains(o))
                .ok_or(LayoutError::BadOrder { side, order })
        };
        let o = Orders {
            left: check(Side::Left, left)?,
            right: check(Side::Right, right)?,
        };
        if o.left == o.right && o.left < PAGE_SHIFT {
            return Err(LayoutError::SameInPage(o.left));
        }
        let grants = o.grant_count();
        let end = GRANTS + 4 * grants;
        for (side, order) in [(Side::Left, o.left), (Side::Right, o.right)] {
            if let Placement::InPage(offset) = placement(order) {
                if end > offset {
                    return Err(LayoutError::GrantsOverlap {
                        grants,
                        side,
                        offset,
                    });
                }
            }
        }
        // With both rings at MAX_ORDER the list is 24 + 2048 bytes: always
        // inside the page, so no further check is needed.
        Ok(o)
    }

    /// Grants in the shared page's list: the left ring's, then the right's.
    pub fn grant_count(self) -> usize {
        pages(self.left) + pages(self.right)
    }

    pub fn left_pages(self) -> usize {
        pages(self.left)
    }

    pub fn right_pages(self) -> usize {
        pages(self.right)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_orders_follow_libxenvchan() {
        // qrexec's control channel and QubesDB ask for small rings: both fit
        // in the shared page.
        assert_eq!(
            Orders::for_server(1024, 2048).unwrap(),
            Orders {
                left: 10,
                right: 11
            }
        );
        assert_eq!(
            Orders::for_server(2048, 1024).unwrap(),
            Orders {
                left: 11,
                right: 10
            }
        );
        // qrexec data connections: 64 KiB each way.
        assert_eq!(
            Orders::for_server(65536, 65536).unwrap(),
            Orders {
                left: 16,
                right: 16
            }
        );
        assert_eq!(
            Orders::for_server(2000, 5000).unwrap(),
            Orders {
                left: 11,
                right: 13
            }
        );
        assert_eq!(
            Orders::for_server(5000, 2000).unwrap(),
            Orders {
                left: 13,
                right: 11
            }
        );
        assert_eq!(
            Orders::for_server(0, 0).unwrap(),
            Orders {
                left: 10,
                right: 11
            }
        );
        assert!(matches!(
            Orders::for_server(MAX_RING_SIZE + 1, 0),
            Err(LayoutError::TooLarge(_))
        ));
    }

    #[test]
    fn every_server_choice_validates() {
        for l in [0, 1000, 1024, 1025, 2048, 2049, 4096, 65536, MAX_RING_SIZE] {
            for r in [0, 1000, 1024, 1025, 2048, 2049, 4096, 65536, MAX_RING_SIZE] {
                let o = Orders::for_server(l, r).unwrap();
                assert_eq!(
                    Orders::validate(o.left.into(), o.right.into()),
                    Ok(o),
                    "{l} {r}"
                );
                assert!(1usize << o.left >= l && 1usize << o.right >= r);
            }
        }
    }

    #[test]
    fn hostile_orders_are_refused() {
        assert!(matches!(
            Orders::validate(9, 11),
            Err(LayoutError::BadOrder {
                side: Side::Left,
                ..
            })
        ));
        assert!(matches!(
            Orders::validate(11, 21),
            Err(LayoutError::BadOrder {
                side: Side::Right,
                ..
            })
        ));
        assert!(matches!(
            Orders::validate(0x10b, 11),
            Err(LayoutError::BadOrder { .. })
        ));
        assert_eq!(Orders::validate(10, 10), Err(LayoutError::SameInPage(10)));
        // 256 grants (1048 bytes of list) would run into a ring at 1024.
        assert!(matches!(
            Orders::validate(10, 20),
            Err(LayoutError::GrantsOverlap { offset: 1024, .. })
        ));
        assert!(Orders::validate(11, 20).is_ok());
        assert!(Orders::validate(20, 20).is_ok());
    }
}
