//! Kernel side of portcullis: cgroup socket hooks that steer guarded
//! connections to the enforcer and remember who made them, and keep raw
//! sockets out of scopes whose egress is denied.
#![no_std]
#![no_main]

mod addr;
mod connect;
mod maps;
mod peername;
mod sockcreate;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this only
    // satisfies the compiler.
    loop {}
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 4] = *b"GPL\0";
