//! What the dom0 agents (qbus, qupdated, qdomd) share: telling qinit they
//! are ready ([`notify`]), logging the way qinit collects it ([`logger`]),
//! and refusing D-Bus callers the bus's table does not list ([`peer`]).

pub mod logger;
pub mod notify;
pub mod peer;
