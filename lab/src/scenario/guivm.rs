//! The GUI VM: qdomd starts the stand-in without any manual step after
//! dom0 is ready, `qdom list` shows it, `xl destroy` from a shell gets it
//! restarted, and stopping qdomd through qinit shuts it down. Its QubesDB
//! is filled by qdomd before it runs and synced into the guest over a
//! vchan. With the app VM beside it: qrexec from dom0, VM to VM under a
//! policy rule, and the Admin API from the GUI VM (refused to the app VM).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};

use super::{field, Ctx, Scenario};

pub const GUIVM: Scenario = Scenario {
    name: "guivm",
    about: "the GUI VM comes up after QINIT-READY with its QubesDB, serves an app VM, runs it through the Admin API, is restarted after xl destroy, stops with qdomd",
    run: guivm,
};

/// qdomd's marker when the GUI VM reports ready.
pub const READY: &str = "QDOMD-GUIVM-READY name=guivm";

/// `qdom list`'s row for the GUI VM: (state, domid).
fn guivm_row(ctx: &mut Ctx<'_>) -> Result<(String, String)> {
    let out = ctx.sh("qdom list")?;
    let row = out
        .lines()
        .find(|l| l.starts_with("guivm "))
        .with_context(|| format!("no guivm in `qdom list`: {out}"))?;
    let cols: Vec<&str> = row.split_whitespace().collect();
    ensure!(cols.len() >= 3, "short row: {row}");
    Ok((cols[1].to_owned(), cols[2].to_owned()))
}

/// Waits until `xl list` no longer shows `vm` (a clean shutdown takes its
/// time under emulation).
fn domain_gone(ctx: &mut Ctx<'_>, vm: &str) -> Result<String> {
    ctx.sh_until(
        "xl list",
        Duration::from_secs(120),
        Duration::from_secs(2),
        |xl| !xl.contains(vm),
    )
}

/// The stand-in's `QGUEST-QUBESDB` line from its console log in dom0 (the
/// guest prints it once its QubesDB is synced).
fn guest_synced(ctx: &mut Ctx<'_>, vm: &str, timeout: Duration) -> Result<String> {
    let console = ctx.sh_until(
        &format!("cat /var/log/xen/console/guest-{vm}.log 2>/dev/null; true"),
        timeout,
        Duration::from_secs(2),
        |c| c.contains("QGUEST-QUBESDB"),
    )?;
    console
        .lines()
        .find(|l| l.contains("QGUEST-QUBESDB"))
        .map(str::to_owned)
        .context("no QGUEST-QUBESDB line")
}

/// The guest's QubesDB: dom0's copy (read through the daemon's socket),
/// the guest's copy (the stand-in prints it once synced over the vchan),
/// and the vchan's xenstore offer, gone once the guest connected.
fn qubesdb(ctx: &mut Ctx<'_>, domid: &str) -> Result<()> {
    let dom0 = ctx.sh("qubesdb-read -d guivm /name /qubes-vm-type /default-user")?;
    let lines: Vec<&str> = dom0.lines().map(str::trim).collect();
    ensure!(lines == ["guivm", "AppVM", "user"], "{dom0}");
    let line = guest_synced(ctx, "guivm", Duration::from_secs(60))?;
    ensure!(field(&line, "name=") == Some("guivm"), "{line}");
    let offer = ctx.sh(&format!(
        "xenstore-ls /local/domain/0/data/vchan/{domid} 2>&1; true"
    ))?;
    ensure!(
        !offer.contains("ring-ref"),
        "the vchan offer is still there: {offer}"
    );
    let rss = ctx.sh("grep VmRSS /proc/$(pidof qubesdb-daemon)/status")?;
    ctx.note(format!("{} / qubesdb-daemon {}", line.trim(), rss.trim()));
    Ok(())
}

/// The app VM stand-in: started on request, its QubesDB names the GUI VM,
/// and it shuts down on request while the GUI VM stays.
fn app_vm(ctx: &mut Ctx<'_>, gui_domid: &str) -> Result<()> {
    ctx.sh("qdom start work")?;
    let line = guest_synced(ctx, "work", Duration::from_secs(120))?;
    ensure!(field(&line, "name=") == Some("work"), "{line}");
    ensure!(
        field(&line, "gui-domain-xid=") == Some(gui_domid),
        "the app VM's GUI VM is not domain {gui_domid}: {line}"
    );
    let dom0 = ctx.sh("qubesdb-read -d work /qubes-base-template /qubes-gui-domain-xid")?;
    let lines: Vec<&str> = dom0.lines().map(str::trim).collect();
    ensure!(lines == ["debian-12", gui_domid], "{dom0}");
    // And from inside the VM, with the VM's own tool.
    let inside = ctx.sh_within(
        "qrexec-client -d work -w 60 root:'qubesdb-read /name /qubes-gui-domain-xid' </dev/null",
        Duration::from_secs(180),
    )?;
    let lines: Vec<&str> = inside.lines().map(str::trim).collect();
    ensure!(
        lines == ["work", gui_domid],
        "qubesdb-read in work: {inside}"
    );
    ctx.note(format!("work: {}", line.trim()));
    qrexec(ctx)?;
    vm_to_vm(ctx)?;
    admin_api(ctx, gui_domid)?;
    ctx.sh("qdom shutdown work")?;
    domain_gone(ctx, "work").context("the app VM did not shut down")?;
    let (state, _) = guivm_row(ctx)?;
    ensure!(
        state == "ready",
        "the GUI VM is {state} after the app VM stopped"
    );
    Ok(())
}

/// dom0 runs commands in the app VM with `qrexec-client`: output, stderr
/// and exit code come back, and 16 MiB piped through return byte for byte.
fn qrexec(ctx: &mut Ctx<'_>) -> Result<()> {
    let out = ctx.sh_within(
        "qrexec-client -d work -w 60 DEFAULT:'echo out; echo err >&2; exit 3' 2>/tmp/qrexec.err; echo rc=$?; cat /tmp/qrexec.err",
        Duration::from_secs(180),
    )?;
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    if lines != ["out", "rc=3", "err"] {
        let console = ctx.sh("cat /var/log/xen/console/guest-work.log")?;
        anyhow::bail!("qrexec-client: {out}\nthe app VM's console:\n{console}");
    }
    let sums = ctx.sh_within(
        "head -c 16777216 /dev/urandom >/tmp/in && sha256sum </tmp/in && \
         qrexec-client -d work -w 60 user:cat </tmp/in | sha256sum",
        Duration::from_secs(600),
    )?;
    let sums: Vec<&str> = sums
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    ensure!(
        sums.len() == 2 && sums[0] == sums[1],
        "16 MiB through qrexec: {sums:?}"
    );
    ctx.note(format!(
        "qrexec: exit code and 16 MiB round trip (sha256 {})",
        &sums[0][..16]
    ));

    // Its qrexec daemon killed: qdomd starts another, the VM keeps
    // running, and calls work again.
    let find = "ps -o pid,args | grep '[q]rexec-daemon [0-9]* work ' | awk '{print $1}'";
    let old = ctx.sh(find)?.trim().to_owned();
    ensure!(!old.is_empty(), "no qrexec-daemon for work");
    ctx.sh(&format!("kill {old}"))?;
    let again = ctx.sh_until(
        "qrexec-client -d work -w 30 user:'echo again' 2>&1; true",
        Duration::from_secs(180),
        Duration::from_secs(3),
        |out| out.trim() == "again",
    )?;
    let new = ctx.sh(find)?.trim().to_owned();
    ensure!(
        !new.is_empty() && new != old,
        "qrexec-daemon {old} was not replaced: {new:?} ({again})"
    );
    let rss = ctx.sh(&format!("grep VmRSS /proc/{new}/status"))?;
    ctx.note(format!(
        "qrexec: daemon {old} killed, {new} took over; qrexec-daemon {}",
        rss.trim()
    ));

    // A hostile VM: the stand-in writes garbage on its control channel
    // when asked. Its daemon cuts it off and says why; the GUI VM keeps
    // working, and the app VM does again once qdomd restarted its daemon.
    ctx.sh("qrexec-client -d work -w 30 'user:QUBESRPC qguest.SendGarbage dom0'; true")?;
    let cut = ctx.wait_for("cutting the VM off", Duration::from_secs(60))?;
    ensure!(cut.contains("qrexec-daemon work "), "{cut}");
    let alive = ctx.sh("qrexec-client -d guivm -w 30 user:'echo alive'")?;
    ensure!(
        alive.trim() == "alive",
        "the GUI VM after the app VM was cut off: {alive}"
    );
    ctx.sh_until(
        "qrexec-client -d work -w 30 user:'echo back' 2>&1; true",
        Duration::from_secs(180),
        Duration::from_secs(3),
        |out| out.trim() == "back",
    )?;
    ctx.note(format!("qrexec: {}", cut.trim()));
    Ok(())
}

/// `qrexec-client-vm` in `vm`, run from dom0: what it prints (NULs shown
/// as `|`) and its exit code.
fn call_from(ctx: &mut Ctx<'_>, vm: &str, target: &str, service: &str) -> Result<(String, i32)> {
    let out = ctx.sh_within(
        &format!(
            "qrexec-client -d {vm} -w 60 root:'qrexec-client-vm {target} {service} </dev/null 2>&1; echo \"rc=$?\"' </dev/null | tr '\\0' '|'"
        ),
        Duration::from_secs(240),
    )?;
    let (body, rc) = out
        .trim_end()
        .rsplit_once("rc=")
        .with_context(|| format!("{vm}: {service}: no exit code in {out:?}"))?;
    let rc = rc
        .trim()
        .parse()
        .with_context(|| format!("{vm}: {service}: exit code in {out:?}"))?;
    Ok((body.to_owned(), rc))
}

/// A call from the app VM to the GUI VM: allowed by a rule on /var, it
/// carries data both ways; with the rule gone, it is refused.
fn vm_to_vm(ctx: &mut Ctx<'_>) -> Result<()> {
    let rule = "/var/lib/qubes/policy.d/50-scenario.policy";
    ctx.sh(&format!(
        "mkdir -p /var/lib/qubes/policy.d && echo 'qguest.Echo * work guivm allow' >{rule}"
    ))?;
    let out = ctx.sh_within(
        "echo through-the-gui-vm | qrexec-client -d work -w 60 root:'qrexec-client-vm guivm qguest.Echo; echo rc=$?'",
        Duration::from_secs(240),
    )?;
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    ensure!(
        lines == ["through-the-gui-vm", "rc=0"],
        "work -> guivm qguest.Echo: {out}"
    );
    ctx.sh(&format!("rm {rule}"))?;
    let (body, rc) = call_from(ctx, "work", "guivm", "qguest.Echo")?;
    ensure!(
        rc == 126 && body.contains("Request refused"),
        "work -> guivm without the rule: rc={rc} {body}"
    );
    let log = ctx.wait_for(
        "qguest.Echo+: work -> guivm: denied",
        Duration::from_secs(30),
    )?;

    // `ask`: the GUI VM's policy.Ask decides (the stand-in answers what
    // /tmp/ask-answer says).
    ctx.sh(&format!("echo 'qguest.Echo * work guivm ask' >{rule}"))?;
    ctx.sh("qrexec-client -d guivm -w 60 root:'printf allow:guivm >/tmp/ask-answer' </dev/null")?;
    let out = ctx.sh_within(
        "echo asked-and-allowed | qrexec-client -d work -w 60 root:'qrexec-client-vm guivm qguest.Echo; echo rc=$?'",
        Duration::from_secs(240),
    )?;
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    ensure!(
        lines == ["asked-and-allowed", "rc=0"],
        "work -> guivm qguest.Echo after allow:guivm: {out}"
    );
    let asked =
        ctx.sh("qrexec-client -d guivm -w 60 root:'cat /tmp/policy-ask.request' </dev/null")?;
    ensure!(
        asked.contains(r#""source":"work""#)
            && asked.contains(r#""service":"qguest.Echo""#)
            && asked.contains(r#""targets":["guivm"]"#),
        "policy.Ask got {asked}"
    );
    ctx.sh("qrexec-client -d guivm -w 60 root:'printf deny >/tmp/ask-answer' </dev/null")?;
    let (body, rc) = call_from(ctx, "work", "guivm", "qguest.Echo")?;
    ensure!(
        rc == 126 && body.contains("Request refused"),
        "work -> guivm with the user saying no: rc={rc} {body}"
    );
    let said_no = ctx.wait_for("the user said no", Duration::from_secs(30))?;
    ctx.sh(&format!("rm {rule}"))?;
    ctx.note(format!(
        "vm to vm: allowed by a rule, then {}; ask: allowed by policy.Ask, then {}",
        log.trim(),
        said_no.trim()
    ));
    Ok(())
}

/// The GUI VM runs the system through the Admin API; the app VM may not.
fn admin_api(ctx: &mut Ctx<'_>, gui_domid: &str) -> Result<()> {
    let (list, rc) = call_from(ctx, "guivm", "dom0", "admin.vm.List")?;
    ensure!(
        rc == 0
            && list
                == "0|dom0 class=AdminVM state=Running\n\
                    guivm class=AppVM state=Running\n\
                    work class=AppVM state=Running\n",
        "guivm: admin.vm.List: rc={rc} {list:?}"
    );
    let (prop, _) = call_from(ctx, "guivm", "work", "admin.vm.property.Get+guivm")?;
    ensure!(prop == "0|default=True type=vm guivm", "{prop:?}");

    let (body, rc) = call_from(ctx, "work", "dom0", "admin.vm.List")?;
    ensure!(
        rc == 126 && body.contains("Request refused"),
        "work: admin.vm.List: rc={rc} {body}"
    );
    let denied = ctx.wait_for(
        "admin.vm.List+: work -> dom0: denied",
        Duration::from_secs(30),
    )?;

    // Events while the GUI VM stops and starts the app VM.
    ctx.sh(
        "(qrexec-client -d guivm root:'qrexec-client-vm dom0 admin.Events </dev/null' \
         </dev/null | tr '\\0' '|' >/tmp/events) >/dev/null 2>&1 & echo $! >/tmp/events.pid",
    )?;
    ctx.sh_until(
        "cat /tmp/events; true",
        Duration::from_secs(120),
        Duration::from_secs(2),
        |e| e.contains("connection-established"),
    )?;
    let (stop, rc) = call_from(ctx, "guivm", "work", "admin.vm.Shutdown+wait")?;
    ensure!(
        rc == 0 && stop == "0|",
        "guivm: Shutdown+wait work: rc={rc} {stop:?}"
    );
    domain_gone(ctx, "work").context("admin.vm.Shutdown did not stop the app VM")?;
    // The next boot's console gets a fresh log (xenconsoled opens it anew
    // for the new domain).
    ctx.sh("mv /var/log/xen/console/guest-work.log /var/log/xen/console/guest-work.log.1")?;
    let (again, _) = call_from(ctx, "guivm", "work", "admin.vm.Shutdown")?;
    ensure!(
        again == "2|QubesVMNotStartedError||Domain is powered off: 'work'|",
        "{again:?}"
    );
    let (start, rc) = call_from(ctx, "guivm", "work", "admin.vm.Start")?;
    ensure!(
        rc == 0 && start == "0|",
        "guivm: Start work: rc={rc} {start:?}"
    );
    let line = guest_synced(ctx, "work", Duration::from_secs(120))?;
    ensure!(field(&line, "gui-domain-xid=") == Some(gui_domid), "{line}");
    let events = ctx.sh_until(
        "cat /tmp/events; true",
        Duration::from_secs(60),
        Duration::from_secs(2),
        |e| e.contains("|work|domain-start|"),
    )?;
    ctx.sh("kill $(cat /tmp/events.pid) 2>/dev/null; true")?;
    for want in [
        "1||connection-established||",
        "1|work|domain-pre-shutdown||",
        "1|work|domain-shutdown||",
        "1|work|domain-stopped||",
        "1|work|domain-pre-start|start_guid|True||",
        "1|work|domain-start|start_guid|True||",
    ] {
        ensure!(
            events.contains(want),
            "no {want:?} in the events: {events:?}"
        );
    }
    ctx.note(format!(
        "admin api: guivm lists, stops and starts work, events streamed; {}",
        denied.trim()
    ));
    Ok(())
}

/// A VM built elsewhere (test images only): a local definition whose
/// kernel and ramdisk are on /var runs with the full set of Qubes
/// daemons once qdomd has read it.
fn elsewhere(ctx: &mut Ctx<'_>) -> Result<()> {
    let dir = "/var/lib/qdomd/vms/elsewhere";
    ctx.sh(&format!(
        "mkdir -p {dir} /var/lib/qdomd/domains && \
         cp /usr/lib/qdomd/guivm/vmlinuz /usr/lib/qdomd/guivm/initrd.gz {dir}/ && \
         printf '%s\\n' 'type = \"pv\"' 'kernel = \"{dir}/vmlinuz\"' \
           'ramdisk = \"{dir}/initrd.gz\"' 'cmdline = \"console=hvc0 loglevel=4\"' \
           'memory_mib = 192' 'vcpus = 1' '[restart]' 'policy = \"never\"' \
           >/var/lib/qdomd/domains/elsewhere.toml"
    ))?;
    // A hostile override beside it: the GUI VM given dom0's own disk.
    // It is refused by name, and the GUI VM runs as the image defines it.
    ctx.sh(
        "printf '%s\\n' '[[disks]]' 'target = \"/dev/vda\"' 'vdev = \"xvdb\"' \
         >/var/lib/qdomd/domains/guivm.toml",
    )?;
    // Definitions are read when qdomd starts.
    ctx.sh("qinit ctl restart qdomd")?;
    let refused = ctx.wait_for(
        "guivm.toml: field `disks[0].target`",
        Duration::from_secs(60),
    )?;
    ctx.wait_for(READY, ctx.timeouts.guivm)?;
    let (state, _) = guivm_row(ctx)?;
    ensure!(
        state == "ready",
        "the GUI VM after a refused override: {state}"
    );
    let xl = ctx.sh("xl block-list guivm 2>&1; true")?;
    ensure!(!xl.contains("xvdb"), "the refused disk is attached: {xl}");
    ctx.sh("rm /var/lib/qdomd/domains/guivm.toml")?;
    ctx.note(format!("a hostile override: {}", refused.trim()));
    ctx.sh("qdom start elsewhere")?;
    let line = guest_synced(ctx, "elsewhere", Duration::from_secs(120))?;
    ensure!(field(&line, "name=") == Some("elsewhere"), "{line}");
    let out = ctx.sh_within(
        "qrexec-client -d elsewhere -w 60 root:'qubesdb-read /name' </dev/null",
        Duration::from_secs(180),
    )?;
    ensure!(out.trim() == "elsewhere", "qrexec in elsewhere: {out}");
    ctx.sh("qdom kill elsewhere")?;
    domain_gone(ctx, "elsewhere")?;
    ctx.note(format!("a VM from /var: {}", line.trim()));
    Ok(())
}

fn guivm(ctx: &mut Ctx<'_>) -> Result<()> {
    let image = ctx.image;
    ctx.boot(image)?;
    ctx.wait_ready()?;
    let ready_at = Instant::now();
    let t = ctx.timeouts.guivm;
    // dom0 does not wait for the GUI VM: its marker comes after READY (the
    // console cursor only moves forward).
    let line = ctx.wait_for(READY, t)?;
    let first = field(&line, "domid=").unwrap_or("?").to_owned();
    ensure!(field(&line, "ms=").is_some(), "{line}");
    ctx.note(format!(
        "{line} ({:.1} s after QINIT-READY)",
        ready_at.elapsed().as_secs_f64()
    ));

    let (state, domid) = guivm_row(ctx)?;
    ensure!(
        (state.as_str(), domid.as_str()) == ("ready", first.as_str()),
        "{state} {domid}"
    );
    let xl = ctx.sh("xl list")?;
    ensure!(xl.contains("guivm"), "{xl}");
    // The guest said it was ready through its own xenstore directory.
    let key = ctx.sh(&format!("xenstore-read /local/domain/{domid}/data/ready"))?;
    ensure!(key.contains("qguest"), "{key}");
    let rss = ctx.sh("grep VmRSS /proc/$(pidof qdom)/status")?;
    ctx.note(format!("qdomd {}", rss.trim()));
    qubesdb(ctx, &domid)?;
    app_vm(ctx, &domid)?;

    // Destroyed behind qdomd's back: it comes back under a new domid.
    ctx.sh(&format!("xl destroy {domid}"))?;
    let line = ctx.wait_for(READY, t)?;
    let second = field(&line, "domid=").unwrap_or("?").to_owned();
    ensure!(second != first, "{line}");
    let (state, domid) = guivm_row(ctx)?;
    ensure!(
        (state.as_str(), domid.as_str()) == ("ready", second.as_str()),
        "{state} {domid}"
    );

    elsewhere(ctx)?;

    // Stopping qdomd through qinit shuts the guest down cleanly: the
    // guest's own poweroff runs, as its console log shows.
    ctx.sh("qinit ctl stop qdomd")?;
    domain_gone(ctx, "guivm").context("the GUI VM did not shut down")?;
    let status = ctx.sh("qinit ctl status")?;
    ensure!(status.contains("qdomd state=stopped"), "{status}");
    let console = ctx.sh("cat /var/log/xen/console/guest-guivm.log")?;
    ensure!(console.contains("qguest: poweroff requested"), "{console}");
    ctx.target.power_off()?;
    Ok(())
}
