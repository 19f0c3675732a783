use crate::{Env, Error};

/// Variable holding the space-separated slot preference, e.g. `A B`.
pub const SLOT_ORDER: &str = "SLOT_ORDER";
/// Largest try count the GRUB script can decrement.
pub const MAX_TRIES: u8 = 9;
/// The check variable: the state's five values joined as
/// `<SLOT_ORDER>:<A_OK><A_TRIES>:<B_OK><B_TRIES>` (`B A:10:03`). GRUB's
/// script has no arithmetic and no hash of a string, but it can join and
/// compare strings, so this is the check it can recompute: a copy whose
/// values were torn or altered apart from it is not whole. It guards
/// against accidents, not an attacker, who can rewrite both.
pub const CHECK: &str = "AB_CHECK";

/// The slot type is the contract crate's: one definition for the
/// partition table, this environment, the kernel command line and qinit.
pub use qcontract::Slot;

/// Health of one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SlotState {
    /// The slot has booted to a healthy userspace and is trusted.
    pub ok: bool,
    /// Trial boots left for a slot that is not `ok` (0..=9).
    pub tries: u8,
}

/// The A/B state kept in the GRUB environment block.
///
/// The methods that change it are pure so the whole update cycle (activate,
/// trial boots, mark good or fall back) can be modelled in tests; the
/// caller moves it in and out of an [`Env`] with [`BootState::from_env`]
/// and [`BootState::apply_to`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootState {
    /// Both slots once each, preferred first.
    pub order: Vec<Slot>,
    pub a: SlotState,
    pub b: SlotState,
}

impl BootState {
    /// A freshly built image: A is trusted and preferred, B is empty.
    pub fn initial() -> BootState {
        BootState {
            order: vec![Slot::A, Slot::B],
            a: SlotState { ok: true, tries: 0 },
            b: SlotState {
                ok: false,
                tries: 0,
            },
        }
    }

    pub fn slot(&self, slot: Slot) -> SlotState {
        match slot {
            Slot::A => self.a,
            Slot::B => self.b,
        }
    }

    pub fn slot_mut(&mut self, slot: Slot) -> &mut SlotState {
        match slot {
            Slot::A => &mut self.a,
            Slot::B => &mut self.b,
        }
    }

    /// Reads the state, rejecting anything the GRUB script would not read
    /// the same way (e.g. `A_TRIES=10` or `A_OK=yes`, which the script
    /// treats as "no tries" and "not OK").
    pub fn from_env(env: &Env) -> Result<BootState, Error> {
        let get = |name: &'static str| env.get(name).ok_or(Error::MissingVariable { name });
        let order_text = get(SLOT_ORDER)?;
        let bad_order = || Error::BadValue {
            name: SLOT_ORDER,
            value: order_text.to_owned(),
            expected: "\"A B\" or \"B A\"",
        };
        // Exactly as written: the script's check compares the raw text.
        let order = match order_text {
            "A B" => vec![Slot::A, Slot::B],
            "B A" => vec![Slot::B, Slot::A],
            _ => return Err(bad_order()),
        };
        let mut state = BootState {
            order,
            a: SlotState::default(),
            b: SlotState::default(),
        };
        for slot in Slot::ALL {
            let ok_name = slot.ok_var();
            let ok = match get(ok_name)? {
                "0" => false,
                "1" => true,
                value => {
                    return Err(Error::BadValue {
                        name: ok_name,
                        value: value.to_owned(),
                        expected: "0 or 1",
                    })
                }
            };
            let tries_name = slot.tries_var();
            let tries_text = get(tries_name)?;
            let tries = match tries_text.as_bytes() {
                [d @ b'0'..=b'9'] => d - b'0',
                _ => {
                    return Err(Error::BadValue {
                        name: tries_name,
                        value: tries_text.to_owned(),
                        expected: "a single digit 0..9",
                    })
                }
            };
            *state.slot_mut(slot) = SlotState { ok, tries };
        }
        let expected = state.check_value();
        match get(CHECK)? {
            found if found == expected => Ok(state),
            found => Err(Error::Check {
                name: CHECK,
                found: found.to_owned(),
                expected,
            }),
        }
    }

    /// The value of [`CHECK`] for this state. Every value it joins has
    /// one spelling ([`BootState::from_env`] accepts no other), so the
    /// script's join of the raw values and this agree.
    pub fn check_value(&self) -> String {
        let order: Vec<String> = self.order.iter().map(Slot::to_string).collect();
        let slot = |s: SlotState| format!("{}{}", u8::from(s.ok), s.tries);
        format!("{}:{}:{}", order.join(" "), slot(self.a), slot(self.b))
    }

    /// Writes the state's variables into `env`, leaving others untouched.
    /// Fails, leaving `env` unchanged, if the state could not be read back
    /// by [`BootState::from_env`] or the GRUB script.
    pub fn apply_to(&self, env: &mut Env) -> Result<(), Error> {
        if !is_valid_order(&self.order) {
            return Err(Error::BadOrder {
                order: self.order.clone(),
            });
        }
        for slot in Slot::ALL {
            let tries = self.slot(slot).tries;
            if tries > MAX_TRIES {
                return Err(Error::BadTries {
                    slot,
                    tries,
                    allowed: "0..=9",
                });
            }
        }
        let order: Vec<String> = self.order.iter().map(Slot::to_string).collect();
        let mut updated = env.clone();
        updated.set(SLOT_ORDER, &order.join(" "))?;
        for slot in Slot::ALL {
            let state = self.slot(slot);
            updated.set(slot.ok_var(), if state.ok { "1" } else { "0" })?;
            updated.set(slot.tries_var(), &state.tries.to_string())?;
        }
        updated.set(CHECK, &self.check_value())?;
        *env = updated;
        Ok(())
    }

    /// Marks a slot unusable (e.g. before overwriting it) and moves it last.
    pub fn invalidate(&mut self, slot: Slot) {
        *self.slot_mut(slot) = SlotState {
            ok: false,
            tries: 0,
        };
        self.order.retain(|&s| s != slot);
        self.order.push(slot);
    }

    /// Makes a freshly written slot the preferred one, on trial: it boots
    /// at most `tries` times (1..=9) unless [`BootState::mark_good`] is
    /// called, after which GRUB falls back to the other slot.
    pub fn activate(&mut self, slot: Slot, tries: u8) -> Result<(), Error> {
        if !(1..=MAX_TRIES).contains(&tries) {
            return Err(Error::BadTries {
                slot,
                tries,
                allowed: "1..=9",
            });
        }
        *self.slot_mut(slot) = SlotState { ok: false, tries };
        self.order.retain(|&s| s != slot);
        self.order.insert(0, slot);
        Ok(())
    }

    /// Records that the slot booted to a healthy userspace.
    pub fn mark_good(&mut self, slot: Slot) {
        *self.slot_mut(slot) = SlotState { ok: true, tries: 0 };
    }

    /// The slot GRUB's script picks by the rules: the first in `order`
    /// that is OK or has tries left. `None` means it falls back to
    /// [`BootState::fallback`].
    pub fn next_boot(&self) -> Option<Slot> {
        self.order.iter().copied().find(|&slot| {
            let state = self.slot(slot);
            state.ok || state.tries > 0
        })
    }

    /// What GRUB's script boots when no slot qualifies: the first slot in
    /// `order`, or A if the order is empty.
    pub fn fallback(&self) -> Slot {
        self.order.first().copied().unwrap_or(Slot::A)
    }

    /// Simulates one boot by the GRUB script: picks [`next_boot`] and, if
    /// that slot is on trial, spends one of its tries. Returns the slot
    /// picked by the rules, or `None` when GRUB would fall back (in which
    /// case nothing is spent).
    ///
    /// [`next_boot`]: BootState::next_boot
    pub fn spend_try(&mut self) -> Option<Slot> {
        let slot = self.next_boot()?;
        let state = self.slot_mut(slot);
        if !state.ok {
            state.tries -= 1;
        }
        Some(slot)
    }
}

fn is_valid_order(order: &[Slot]) -> bool {
    order.len() == 2 && order[0] != order[1]
}
