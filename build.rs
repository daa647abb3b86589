//! Compiles proto/ with a vendored protoc, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY of intent: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Bulk content: shared between followers on the leader and sliced
        // out of the received buffer on a follower, never copied.
        .bytes(".clusterd.peer.v1.StageRequest.data")
        // Reserves each message's size before encoding it (see the type).
        .codec_path("crate::net::proto::Codec")
        .compile_protos(&["proto/peer.proto", "proto/admin.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
