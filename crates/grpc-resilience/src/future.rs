//! The futures, bodies and inner services of a
//! [`ResilientChannel`](crate::ResilientChannel) stack, for naming its types.

pub use crate::attempt::Attempt;
pub use crate::guard::{Guard, GuardBody, GuardFuture, Guards, Reports};
pub use crate::stack::{ResilientBody, ResponseFuture};
