//! The named values of the run config's enums: each enum lists every value once ([`ConfigEnum::ALL`]) and its
//! config name is its serde name, so `--set`, the CLI's typed flags ([`parse_name`] behind their `FromStr`), the
//! plan resolver's value table (a test checks it names every value) and the Studio's menus read the same list.

/// An enum of the run config: every value, and its name in configs.
pub trait ConfigEnum: Sized + Copy + serde::Serialize + 'static {
    /// Every value, in the order menus show them.
    const ALL: &'static [Self];

    /// The value's name in configs (its serde name, e.g. `focus-dpo`).
    fn config_name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Every config name.
    fn config_names() -> Vec<String> {
        Self::ALL.iter().map(|v| v.config_name()).collect()
    }
}

/// The value named `text` (case, `_` for `-` and surrounding space forgiven), or an error listing the names.
pub fn parse_name<T: ConfigEnum>(text: &str) -> Result<T, String> {
    let key = text.trim().to_ascii_lowercase().replace('_', "-");
    T::ALL
        .iter()
        .copied()
        .find(|v| v.config_name() == key)
        .ok_or_else(|| format!("`{text}` is none of {}", T::config_names().join(", ")))
}

/// `impl ConfigEnum` with the listed values, and `FromStr` through [`parse_name`].
#[macro_export]
macro_rules! config_enum {
    ($t:ty, [$($v:expr),+ $(,)?]) => {
        impl $crate::config_enum::ConfigEnum for $t {
            const ALL: &'static [Self] = &[$($v),+];
        }
        impl ::std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> ::std::result::Result<Self, String> {
                $crate::config_enum::parse_name(s)
            }
        }
    };
    // For enums that already list their values in a const `ALL` array and have their own `FromStr`.
    (no_from_str $t:ty, $all:expr) => {
        impl $crate::config_enum::ConfigEnum for $t {
            const ALL: &'static [Self] = &$all;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masks::attention_field::Similarity;

    #[test]
    fn names_are_serde_names_and_parse_back() {
        assert_eq!(Similarity::config_names(), ["cosine", "squared-norm"]);
        assert_eq!(parse_name::<Similarity>(" Squared_Norm "), Ok(Similarity::SquaredNorm));
        let e = parse_name::<Similarity>("dot").unwrap_err();
        assert!(e.contains("cosine, squared-norm"), "{e}");
        assert_eq!("cosine".parse::<Similarity>(), Ok(Similarity::Cosine));
    }
}
