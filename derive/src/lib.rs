//! `#[derive(Resource)]`: declares one of your own kinds for kvsync, in the manner of
//! kube-derive's `CustomResource`. Use it through `kvsync_model::Resource` (feature `derive`,
//! on by default).
//!
//! ```
//! use kvsync_model::{Registry, Resource, Validate};
//! use serde::{Deserialize, Serialize};
//!
//! /// A tenant's project (the CRD's schema comes from `JsonSchema`).
//! #[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, Resource)]
//! #[resource(group = "example.com", version = "v1", kind = "Project", plural = "projects", namespaced, shortname = "proj")]
//! struct Project {
//!     owner: String,
//! }
//!
//! // Rules beyond the type: implement `Validate` and the derived `Resource` uses it.
//! impl Validate for Project {
//!     fn validate(&self) -> kvsync_model::Result<()> {
//!         if self.owner.is_empty() {
//!             return Err(kvsync_model::Error::invalid("spec.owner", "must not be empty"));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! assert_eq!(Project::PLURAL, "projects");
//! assert!(Project::NAMESPACED);
//! assert_eq!(Project::schema()["properties"]["owner"]["type"], "string");
//! assert!(Resource::validate(&Project { owner: String::new() }).is_err());
//! let registry = Registry::new().with::<Project>();
//! assert_eq!(registry.resolve("proj").unwrap().kind, "Project");
//! ```
//!
//! | attribute | meaning | default |
//! |---|---|---|
//! | `group = "example.com"` | the API group (a DNS subdomain) | required |
//! | `version = "v1"` | the API version (a DNS-1123 label) | `v1` |
//! | `kind = "Project"` | the kind, UpperCamelCase | the type's name |
//! | `plural = "projects"` | the plural in paths and URLs (a DNS-1123 label) | the kind in lower case with `s` |
//! | `namespaced` | the kind lives in namespaces | cluster-scoped |
//! | `shortname = "proj"` | a short name for the CLI (repeatable; DNS-1123 labels) | none |
//!
//! The CRD schema is the type's `schemars::JsonSchema` schema when it derives `JsonSchema`,
//! and any object otherwise; validation is the type's `kvsync_model::Validate` impl when it
//! has one, and none otherwise. Misuse is a compile error naming the attribute.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::quote;
use syn::{DeriveInput, Error, LitStr, parse_macro_input, spanned::Spanned};

/// Implements `kvsync_model::Resource` for a struct or enum: see the crate docs for the
/// `#[resource(...)]` attributes.
#[proc_macro_derive(Resource, attributes(resource))]
pub fn derive_resource(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

#[derive(Default)]
struct Attrs {
    group: Option<LitStr>,
    version: Option<LitStr>,
    kind: Option<LitStr>,
    plural: Option<LitStr>,
    namespaced: Option<Span>,
    short_names: Vec<LitStr>,
}

fn set_once(slot: &mut Option<LitStr>, value: LitStr, name: &str) -> syn::Result<()> {
    if slot.is_some() {
        return Err(Error::new(
            value.span(),
            format!("`{name}` is given twice in #[resource(...)]"),
        ));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_attrs(input: &DeriveInput) -> syn::Result<Attrs> {
    let mut attrs = Attrs::default();
    let mut seen = false;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("resource")) {
        seen = true;
        attr.parse_nested_meta(|meta| {
            let path = &meta.path;
            let name = quote!(#path).to_string().replace(' ', "");
            match name.as_str() {
                "group" => set_once(&mut attrs.group, meta.value()?.parse()?, "group"),
                "version" => set_once(&mut attrs.version, meta.value()?.parse()?, "version"),
                "kind" => set_once(&mut attrs.kind, meta.value()?.parse()?, "kind"),
                "plural" => set_once(&mut attrs.plural, meta.value()?.parse()?, "plural"),
                "shortname" => {
                    attrs.short_names.push(meta.value()?.parse()?);
                    Ok(())
                }
                "namespaced" => {
                    if attrs.namespaced.is_some() {
                        return Err(meta.error("`namespaced` is given twice in #[resource(...)]"));
                    }
                    attrs.namespaced = Some(meta.path.span());
                    Ok(())
                }
                _ => Err(meta.error(format!(
                    "unknown attribute `{name}` in #[resource(...)]: expected one of group, \
                     version, kind, plural, namespaced, shortname"
                ))),
            }
        })?;
    }
    if !seen {
        return Err(Error::new(
            input.ident.span(),
            "#[derive(Resource)] needs #[resource(group = \"...\")] (at least the API group)",
        ));
    }
    Ok(attrs)
}

/// A DNS-1123 label: 1-63 of `a-z0-9-`, starting and ending with a letter or digit.
fn is_dns_label(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| alnum(c) || c == '-')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// UpperCamelCase: an upper-case ASCII letter, then ASCII letters and digits.
fn is_upper_camel(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphanumeric())
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    if !input.generics.params.is_empty() {
        return Err(Error::new(
            input.generics.span(),
            "#[derive(Resource)] needs a type without generic parameters: a kind has one schema",
        ));
    }
    let attrs = parse_attrs(input)?;
    let ident = &input.ident;

    let group = attrs.group.ok_or_else(|| {
        Error::new(
            input.ident.span(),
            "#[resource(...)] needs `group = \"...\"`: the API group of the kind, e.g. \
             group = \"example.com\"",
        )
    })?;
    if !is_dns_subdomain(&group.value()) {
        return Err(Error::new(
            group.span(),
            format!(
                "group {:?} must be a DNS subdomain: lower-case letters, digits, '-' and '.', \
                 e.g. \"example.com\"",
                group.value()
            ),
        ));
    }
    let version = attrs
        .version
        .unwrap_or_else(|| LitStr::new("v1", Span::call_site()));
    if !is_dns_label(&version.value()) {
        return Err(Error::new(
            version.span(),
            format!(
                "version {:?} must be a DNS-1123 label, e.g. \"v1\" or \"v1beta1\"",
                version.value()
            ),
        ));
    }
    let kind = attrs
        .kind
        .unwrap_or_else(|| LitStr::new(&ident.to_string(), ident.span()));
    if !is_upper_camel(&kind.value()) {
        return Err(Error::new(
            kind.span(),
            format!(
                "kind {:?} must be UpperCamelCase: an upper-case letter, then letters and \
                 digits, e.g. \"NetworkPolicy\"",
                kind.value()
            ),
        ));
    }
    let plural = attrs.plural.unwrap_or_else(|| {
        LitStr::new(
            &format!("{}s", kind.value().to_ascii_lowercase()),
            kind.span(),
        )
    });
    if !is_dns_label(&plural.value()) {
        return Err(Error::new(
            plural.span(),
            format!(
                "plural {:?} must be a DNS-1123 label: lower-case letters, digits and '-', \
                 e.g. \"networkpolicies\"",
                plural.value()
            ),
        ));
    }
    for short in &attrs.short_names {
        if !is_dns_label(&short.value()) {
            return Err(Error::new(
                short.span(),
                format!(
                    "shortname {:?} must be a DNS-1123 label: lower-case letters, digits and '-'",
                    short.value()
                ),
            ));
        }
    }
    let namespaced = attrs.namespaced.is_some();
    let short_names = &attrs.short_names;

    Ok(quote! {
        impl ::kvsync_model::Resource for #ident {
            const KIND: &'static str = #kind;
            const PLURAL: &'static str = #plural;
            const NAMESPACED: bool = #namespaced;
            const GROUP: &'static str = #group;
            const VERSION: &'static str = #version;
            const SHORT_NAMES: &'static [&'static str] = &[#(#short_names),*];

            fn schema() -> ::kvsync_model::__private::serde_json::Value {
                #[allow(unused_imports)]
                use ::kvsync_model::__private::{ViaAnyObject as _, ViaJsonSchema as _};
                (&&::kvsync_model::__private::Probe::<#ident>(::core::marker::PhantomData))
                    .kvsync_schema()
            }

            fn validate(&self) -> ::kvsync_model::Result<()> {
                #[allow(unused_imports)]
                use ::kvsync_model::__private::{ViaNoRules as _, ViaValidate as _};
                (&&::kvsync_model::__private::Probe::<#ident>(::core::marker::PhantomData))
                    .kvsync_validate(self)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kubernetes_rules() {
        assert!(is_dns_label("projects"));
        assert!(is_dns_label("ip-pools2"));
        assert!(!is_dns_label("Projects"));
        assert!(!is_dns_label("-x"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_subdomain("example.com"));
        assert!(!is_dns_subdomain("example..com"));
        assert!(!is_dns_subdomain("Example.com"));
        assert!(is_upper_camel("IPPool"));
        assert!(!is_upper_camel("ipPool"));
        assert!(!is_upper_camel("IP_Pool"));
    }
}
