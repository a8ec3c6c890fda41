//! A value of the config file with where it was written, so that
//! validation can name the line. The location is the config module's
//! business: everywhere else a `Spanned<T>` reads as the `T` it holds
//! (it dereferences to it), and only config/ sees or sets the location.

use std::{
    fmt,
    ops::{Deref, DerefMut},
};

use serde::{Deserialize, Deserializer};
use serde_saphyr::Location;

/// A value and where the file gave it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Spanned<T> {
    pub(in crate::config) value: T,
    /// Where the value was used (an alias's use, not its anchor).
    pub(in crate::config) referenced: Location,
}

impl<T> Spanned<T> {
    /// The value (the same as dereferencing).
    pub fn get(&self) -> &T {
        &self.value
    }

    /// The value, to change in place.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T> Deref for Spanned<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for Spanned<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T: fmt::Debug> fmt::Debug for Spanned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl<T: fmt::Display> fmt::Display for Spanned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let read = serde_saphyr::Spanned::<T>::deserialize(deserializer)?;
        Ok(Spanned {
            value: read.value,
            referenced: read.referenced,
        })
    }
}
