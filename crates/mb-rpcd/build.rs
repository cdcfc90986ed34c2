//! Rebuilds mb-rpcd when a migration is added: `sqlx::migrate!` embeds the migrations
//! at compile time, and on a stable toolchain cargo does not see a new file by itself.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
