//! The catalogue: every method, one line each, with how its options build it. The
//! command line's choices, the explorer's `/api/info`, the test suites and the benches
//! read their lists from here.

use super::info::{MethodInfo, Variant};
use super::options::MethodOptions;
use super::{
    Method, cosformer, delta_rule, fnet, gated_delta_rule, gla, hybrid, linear, linformer,
    performer, retention, softmax, window,
};
use crate::base::{Error, Result};

/// A method's entry and how its options build it.
struct Entry {
    info: MethodInfo,
    build: fn(&MethodOptions) -> Result<Method>,
}

static CATALOGUE: [Entry; 12] = [
    Entry {
        info: softmax::INFO,
        build: |o| softmax::Softmax::from_options(o).map(Method::Softmax),
    },
    Entry {
        info: window::INFO,
        build: |o| window::Window::from_options("window", o).map(Method::Window),
    },
    Entry {
        info: linear::INFO,
        build: |o| linear::Linear::from_options(o).map(Method::Linear),
    },
    Entry {
        info: performer::INFO,
        build: |o| performer::Performer::from_options(o).map(Method::Performer),
    },
    Entry {
        info: cosformer::INFO,
        build: |o| cosformer::Cosformer::from_options(o).map(Method::Cosformer),
    },
    Entry {
        info: linformer::INFO,
        build: |o| linformer::Linformer::from_options(o).map(Method::Linformer),
    },
    Entry {
        info: fnet::INFO,
        build: |_| Ok(Method::Fnet(fnet::Fnet)),
    },
    Entry {
        info: hybrid::INFO,
        build: |o| hybrid::Hybrid::from_options(o).map(Method::Hybrid),
    },
    Entry {
        info: retention::INFO,
        build: |o| retention::Retention::from_options(o).map(Method::Retention),
    },
    Entry {
        info: gla::INFO,
        build: |o| gla::Gla::from_options(o).map(Method::Gla),
    },
    Entry {
        info: delta_rule::INFO,
        build: |o| delta_rule::DeltaRule::from_options(o).map(Method::DeltaRule),
    },
    Entry {
        info: gated_delta_rule::INFO,
        build: |o| gated_delta_rule::GatedDeltaRule::from_options(o).map(Method::GatedDeltaRule),
    },
];

/// Every method, in the order the command line and the explorer list them.
///
/// ```
/// let names: Vec<&str> = linattn::catalogue().map(|m| m.name).collect();
/// assert_eq!(names[0], "softmax");
/// assert!(names.contains(&"performer"));
/// ```
pub fn catalogue() -> impl ExactSizeIterator<Item = &'static MethodInfo> + Clone {
    CATALOGUE.iter().map(|entry| &entry.info)
}

/// The entry of the method or [`Variant`] called `name`, with the variant.
///
/// ```
/// let (softmax, naive) = linattn::find_method("softmax-naive").unwrap();
/// assert_eq!((softmax.name, naive.unwrap().options), ("softmax", &[("algorithm", "naive")][..]));
/// assert!(linattn::find_method("nope").is_none());
/// ```
pub fn find_method(name: &str) -> Option<(&'static MethodInfo, Option<&'static Variant>)> {
    find_entry(name).map(|(entry, variant)| (&entry.info, variant))
}

fn find_entry(name: &str) -> Option<(&'static Entry, Option<&'static Variant>)> {
    CATALOGUE.iter().find_map(|entry| {
        if entry.info.name == name {
            return Some((entry, None));
        }
        let variant = entry.info.variants.iter().find(|v| v.name == name)?;
        Some((entry, Some(variant)))
    })
}

impl Method {
    /// The method (or [`Variant`]) called `name` in the [`catalogue`], configured by
    /// `options`; an option it does not take is an error, as is one it needs and lacks.
    ///
    /// ```
    /// use linattn::{Method, MethodOptions};
    /// let options = MethodOptions::new(64, 1024);
    /// let naive = Method::from_options("softmax-naive", &options).unwrap();
    /// assert_eq!(naive.name(), "softmax");
    /// assert!(Method::from_options("nope", &options).is_err());
    /// ```
    pub fn from_options(name: &str, options: &MethodOptions) -> Result<Method> {
        let (entry, variant) = find_entry(name).ok_or_else(|| {
            let names: Vec<&str> = catalogue().map(|m| m.name).collect();
            Error::InvalidConfig(format!(
                "no method {name:?}; the methods are {}",
                names.join(", ")
            ))
        })?;
        entry.info.check_options(options)?;
        match variant {
            None => (entry.build)(options),
            Some(variant) => {
                let mut options = options.clone();
                for (option, value) in variant.options {
                    options.set(option, value);
                }
                (entry.build)(&options)
            }
        }
    }
}
