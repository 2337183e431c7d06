//! Misuse of `#[derive(Resource)]` is a compile error with a clear message; good uses build.

#[test]
fn misuse_is_a_compile_error_naming_the_attribute() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
