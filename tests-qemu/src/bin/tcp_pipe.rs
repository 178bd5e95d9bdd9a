//! `tcp_pipe HOST:PORT`: joins its stdin and stdout to a TCP connection.
//! QEMU runs it for each connection the box opens to a `guestfwd` address
//! (`guestfwd=tcp:10.0.2.100:80-cmd:tcp_pipe 127.0.0.1:PORT`), which reaches
//! a server on the host even though the box's network is `restrict=on`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

fn main() -> std::process::ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: tcp_pipe HOST:PORT");
        return std::process::ExitCode::from(2);
    };
    let s = match TcpStream::connect(&addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tcp_pipe: {addr}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let Ok(mut up) = s.try_clone() else {
        return std::process::ExitCode::FAILURE;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut up);
        let _ = up.shutdown(Shutdown::Write);
    });
    let mut down = s;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match down.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    }
    std::process::ExitCode::SUCCESS
}
