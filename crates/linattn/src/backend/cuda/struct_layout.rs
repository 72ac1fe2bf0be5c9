//! Test support: the kernels' parameter structs as their C declarations lay them out,
//! for the launch files' tests to check their Rust mirrors against.

/// Each field of Rust struct `$ty` the list names, for [`layout::assert_mirrors`]. The
/// pattern without `..` must name every field, so the list cannot leave one out.
macro_rules! rust_fields {
    ($ty:ident { $($field:ident),* $(,)? }) => {{
        let _names_every_field = |params: $ty| {
            let $ty { $($field: _),* } = params;
        };
        vec![$($crate::backend::cuda::struct_layout::layout::RustField::of(
            stringify!($field),
            std::mem::offset_of!($ty, $field),
            |params: &$ty| &params.$field,
        )),*]
    }};
}
pub(super) use rust_fields;

/// The kernels' parameter structs as their C declarations lay them out, read from the
/// sources NVRTC compiles: the tests of each launch file check their Rust mirrors against
/// them field by field (name, offset, size, type), so that a field added, moved or retyped
/// on one side only fails a test instead of shifting every argument after it.
pub(super) mod layout {
    use crate::backend::cuda::device::Source;

    /// A field of a Rust mirror, as [`rust_fields`](super::rust_fields) lists it.
    pub(crate) struct RustField {
        name: &'static str,
        offset: usize,
        size: usize,
        type_name: &'static str,
    }

    impl RustField {
        pub(crate) fn of<S, F>(name: &'static str, offset: usize, _field: fn(&S) -> &F) -> Self {
            Self {
                name,
                offset,
                size: size_of::<F>(),
                type_name: std::any::type_name::<F>(),
            }
        }
    }

    /// A field of a C struct: its offset and size, and the Rust type that mirrors its C
    /// type (none for a nested struct, whose own mirror is checked apart).
    struct CField {
        name: String,
        offset: usize,
        size: usize,
        rust_type: Option<&'static str>,
    }

    struct CStruct {
        fields: Vec<CField>,
        size: usize,
        align: usize,
    }

    /// Size, alignment and Rust mirror of a C field's type on the device (64-bit
    /// pointers, which [`CUdeviceptr`](cudarc::driver::sys::CUdeviceptr) mirrors).
    fn c_type(source: &str, base: &str, pointer: bool) -> (usize, usize, Option<&'static str>) {
        match (pointer, base) {
            (true, _) => (8, 8, Some("u64")),
            (false, "int") => (4, 4, Some("i32")),
            (false, "float") => (4, 4, Some("f32")),
            (false, "long long") => (8, 8, Some("i64")),
            (false, name) => {
                let nested = c_struct(source, name);
                (nested.size, nested.align, None)
            }
        }
    }

    /// `struct name { ... };` of `source`, laid out by C's rules: each field at the next
    /// multiple of its alignment, the size a multiple of the largest. Takes the forms the
    /// kernels' structs use: one field or several (`int span, parts;`) per declaration,
    /// pointers to const or not, and line comments.
    fn c_struct(source: &str, name: &str) -> CStruct {
        let opening = format!("struct {name} {{");
        assert_eq!(
            source.matches(&opening).count(),
            1,
            "one declaration of struct {name}"
        );
        let body = &source[source.find(&opening).unwrap() + opening.len()..];
        let body: String = body[..body.find('}').expect("the end of the struct")]
            .lines()
            .map(|line| line.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let (mut fields, mut offset, mut align) = (Vec::new(), 0usize, 1);
        for declaration in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
            assert!(
                !declaration.contains(['[', '(', '/']),
                "{name}: `{declaration}` is not a form this reads"
            );
            let mut base = None;
            for declarator in declaration.split(',') {
                let spaced = declarator.replace('*', " * ");
                let tokens: Vec<&str> = spaced
                    .split_whitespace()
                    .filter(|token| !matches!(*token, "const" | "__restrict__"))
                    .collect();
                let (field, type_tokens) = tokens.split_last().expect("a field name");
                let pointer = type_tokens.contains(&"*");
                // The first declarator names the type; the others share it.
                let base = base.get_or_insert_with(|| {
                    type_tokens
                        .iter()
                        .filter(|token| **token != "*")
                        .copied()
                        .collect::<Vec<_>>()
                        .join(" ")
                });
                let (size, field_align, rust_type) = c_type(source, base, pointer);
                offset = offset.next_multiple_of(field_align);
                align = align.max(field_align);
                fields.push(CField {
                    name: field.to_string(),
                    offset,
                    size,
                    rust_type,
                });
                offset += size;
            }
        }
        CStruct {
            fields,
            size: offset.next_multiple_of(align),
            align,
        }
    }

    /// The most bytes a by-value kernel parameter may take: NVVM keeps a larger one in
    /// memory and takes what is read from it for values that may differ between threads,
    /// and no longer unswitches loops on them (linear.cu's LinearParams says what that
    /// cost).
    const MAX_PARAMETER_BYTES: usize = 128;

    /// Checks that `R`, whose fields are `rust`, lays out as `struct c_name` of `source`
    /// does, `size` bytes (worked out by hand from the declaration, a check of this
    /// reading of it), within [`MAX_PARAMETER_BYTES`].
    #[track_caller]
    pub(crate) fn assert_mirrors<R>(source: Source, c_name: &str, size: usize, rust: &[RustField]) {
        let c = c_struct(&source.code().0, c_name);
        assert_eq!(c.size, size, "struct {c_name}'s size in C");
        assert!(
            size <= MAX_PARAMETER_BYTES,
            "struct {c_name} takes {size} bytes, more than a kernel parameter should"
        );
        assert_eq!(size_of::<R>(), size, "the size of {c_name}'s mirror");
        assert_eq!(
            align_of::<R>(),
            c.align,
            "the alignment of {c_name}'s mirror"
        );
        let names = |names: Vec<&str>| names.join(", ");
        assert_eq!(
            names(rust.iter().map(|field| field.name).collect()),
            names(c.fields.iter().map(|field| field.name.as_str()).collect()),
            "{c_name}'s fields in Rust and in C"
        );
        for (rust, c) in rust.iter().zip(&c.fields) {
            let field = format!("{c_name}::{}", c.name);
            assert_eq!(rust.offset, c.offset, "{field}'s offset");
            assert_eq!(rust.size, c.size, "{field}'s size");
            if let Some(rust_type) = c.rust_type {
                assert_eq!(rust.type_name, rust_type, "{field}'s type");
            }
        }
    }

    #[test]
    fn c_layout_pads_each_field_to_its_alignment() {
        let source = "struct Inner {\n    int a;  // a comment; with a semicolon\n    long long b;\n};\n\
                      struct Outer { float x; Inner inner; const float *p, q; int r; };";
        let outer = c_struct(source, "Outer");
        let fields: Vec<_> = outer
            .fields
            .iter()
            .map(|field| {
                (
                    field.name.as_str(),
                    field.offset,
                    field.size,
                    field.rust_type,
                )
            })
            .collect();
        assert_eq!(
            fields,
            [
                ("x", 0, 4, Some("f32")),
                ("inner", 8, 16, None),
                ("p", 24, 8, Some("u64")),
                ("q", 32, 4, Some("f32")),
                ("r", 36, 4, Some("i32")),
            ]
        );
        assert_eq!((outer.size, outer.align), (40, 8));
    }
}
