//! The fake lguest Guest ("lguest"): fakehost plays the Guests that Launchers run through
//! cusedev's `/dev/lguest`. So far: [`script`], the language the Guests' scripts are written
//! in (docs/lguest-guest.md).

pub mod script;
