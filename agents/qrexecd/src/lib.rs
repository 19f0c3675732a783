//! What qrexecd's two programs share: the local socket protocol between
//! dom0's clients and a VM's qrexec-daemon ([`local`]), and the calls a VM
//! makes ([`call`]: the policy query and what an allowed call runs).

pub mod call;
pub mod local;
