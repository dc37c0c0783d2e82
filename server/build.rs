//! The dashboard (`web/dist`) is compiled into the binary: rebuild when it
//! changes, and when it appears after a build that found none.

fn main() {
    let dist = std::path::Path::new("../web/dist");
    if dist.join("index.html").is_file() {
        println!("cargo:rerun-if-changed=../web/dist");
    } else {
        // Not built yet: watch web/ so `npm run build` there triggers a rebuild.
        println!("cargo:rerun-if-changed=../web");
        println!(
            "cargo:warning=web/dist is not built: this sluice binary will serve no dashboard \
             (run `npm ci && npm run build` in web/ first)"
        );
    }
}
