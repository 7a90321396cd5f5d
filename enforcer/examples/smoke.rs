use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
fn netns_cookie() -> u64 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut v: u64 = 0;
    let mut len = 8u32;
    let r = unsafe { libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, 71, (&raw mut v).cast(), &mut len) };
    assert_eq!(r, 0);
    v
}
fn main() {
    let dir = std::path::Path::new("/sys/fs/bpf/enforcer-smoke");
    let k = enforcer::bpf::Kernel::open(dir, enforcer::bpf::EBPF_OBJECT).unwrap();
    let h = enforcer::cgroup::Hierarchy::discover().unwrap();
    let cg = h.ensure(std::path::Path::new("enforcer-smoke")).unwrap();
    let id = enforcer::cgroup::cgroup_id(&cg).unwrap();
    println!("{:?}", k.attach_cgroup(&cg, id).unwrap());
    k.set_config(enforcer_common::GlobalConfig { layout_version: 1, flags: enforcer_common::global_flags::READY, proxy_port: 18001, dns_port: 18002, _pad0: 0, netns_cookie: netns_cookie() }).unwrap();
    k.set_agent_flags(1, enforcer_common::agent_flags::ACTIVE).unwrap();
    k.map_cgroup(id, 1).unwrap();
    k.replace_allowlist(1, &[enforcer::bpf::AllowEntry { net: "127.0.0.6/32".parse().unwrap(), port: Some(9), expires_boot_ns: 0, flags: enforcer_common::allow_flags::EXPLICIT }]).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:18001").unwrap();
    let procs = cg.join("cgroup.procs");
    let run = |args: &[&str]| {
        let procs = procs.clone();
        let mut c = std::process::Command::new(args[0]);
        c.args(&args[1..]);
        unsafe { c.pre_exec(move || { std::fs::write(&procs, std::process::id().to_string()).map(|_| ()) }); }
        c.spawn().unwrap()
    };
    let mut child = run(&["python3", "-c", "import socket;s=socket.create_connection(('127.0.0.6',9));print('peer',s.getpeername());s.close()"]);
    let (_s, peer) = l.accept().unwrap();
    println!("accepted from {peer}: {:?}", k.take_orig(peer));
    println!("child: {:?}", child.wait());
    let mut child = run(&["python3", "-c", "import socket\ntry:\n socket.create_connection(('127.0.0.7',9))\nexcept Exception as e: print('refused', e)"]);
    println!("child: {:?}", child.wait());
    let mut child = run(&["python3", "-c", "import socket\ns=socket.socket(socket.AF_INET6)\ns.connect(('::ffff:127.0.0.6',9))\nprint('v6 peer', s.getpeername())"]);
    let (_s, peer) = l.accept().unwrap();
    println!("accepted from {peer}: {:?}", k.take_orig(peer).map(|o| (enforcer::bpf::ip_of(&o.addr), o.port, o.family)));
    println!("child: {:?}", child.wait());
    println!("counters {:?}", k.counters(1));
    k.detach_cgroup(id).unwrap();
    std::fs::remove_dir(&cg).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
