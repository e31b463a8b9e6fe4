//! Runs `sleap-nn` as a child process and reports what it does.
//!
//! Training: two ZMQ sockets are bound on free loopback ports *before* the process starts (SUB
//! for its progress, PUB for our commands; sleap-nn connects to both), their ports go into the
//! argv, and progress flows through [`ProgressRelay`]. A stop is sleap-nn's JSON command, re-sent
//! until `train_end` arrives (a PUB message sent before its SUB connects is lost), with SIGINT as
//! a fallback; a cancel is SIGTERM to the process group, then SIGKILL after a grace period.
//! Inference: `predict --gui` prints JSON progress lines on stdout.
//!
//! The child gets its own process group (so signals reach any DDP re-spawn too) and default
//! SIGINT/SIGTERM dispositions (a worker started in the background of a script inherits SIGINT
//! as ignored, which would make the SIGINT fallback a no-op).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::AsyncReadExt;
use sleap_rtc_core::job::bridge::{InferenceLine, LogCoalescer, LogLine, ProgressRelay, parse_inference_line};
use sleap_rtc_core::job::{Interrupt, Progress, Stream};
use tokio::sync::{mpsc, watch};
use zeromq::{Socket, SocketRecv, SocketSend};

use crate::{ChildPipe, ChildProcess, Runtime};

/// What a running trainer reports.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainerEvent {
    /// The process started with this pid (also its process group id).
    Spawned(u32),
    Progress(Progress),
    Log(LogLine),
    /// One of sleap-nn's ZMQ messages as it came (throttled: see `bridge::ReportThrottle`).
    Report(String),
}

/// Timing of stop and cancel.
#[derive(Debug, Clone)]
pub struct Supervision {
    /// How often a stop command is re-sent until `train_end`.
    pub stop_resend: Duration,
    /// After this long without `train_end`, a stop falls back to SIGINT.
    pub stop_sigint_after: Duration,
    /// SIGTERM → SIGKILL grace period of a cancel.
    pub cancel_grace: Duration,
    /// Batch progress is sent at most this often.
    pub batch_every: Duration,
    /// `\r` progress-bar redraws are sent at most this often.
    pub redraw_every: Duration,
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            stop_resend: Duration::from_secs(2),
            stop_sigint_after: Duration::from_secs(120),
            cancel_grace: Duration::from_secs(5),
            batch_every: Duration::from_millis(500),
            redraw_every: Duration::from_millis(500),
        }
    }
}

/// How the process ended.
#[derive(Debug, Clone, Default)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub train_end: bool,
    /// `predict --gui`'s error line, if it printed one.
    pub error: Option<String>,
    /// The last lines of stderr, for a failure message.
    pub stderr_tail: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("cannot bind the ZMQ progress sockets: {0}")]
    Zmq(String),
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
}

/// The user's stop/cancel, as [`run_train`] and [`run_predict`] receive it.
pub type InterruptRx = watch::Receiver<Option<Interrupt>>;
/// Where [`run_train`] and [`run_predict`] send what the trainer does.
pub type EventTx = mpsc::UnboundedSender<TrainerEvent>;

/// A child process to run.
pub struct Launch {
    pub program: PathBuf,
    pub cwd: PathBuf,
    /// Raw stdout and stderr are appended here (the job's log on disk).
    pub log_file: PathBuf,
}

fn command(l: &Launch, args: &[String]) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut c = std::process::Command::new(&l.program);
    c.args(args).current_dir(&l.cwd).env("PYTHONUNBUFFERED", "1").process_group(0);
    // SAFETY: only async-signal-safe calls (signal(2)) between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            Ok(())
        });
    }
    c
}

fn signal_group(pid: Option<u32>, sig: i32) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) on our own child's process group; a stale id fails harmlessly (ESRCH).
        unsafe {
            libc::kill(-(pid as i32), sig);
        }
    }
}

/// Binds a ZMQ SUB (progress) and PUB (control) on free loopback ports.
async fn bind_zmq() -> Result<(zeromq::SubSocket, zeromq::PubSocket, u16, u16), TrainerError> {
    let err = |e: zeromq::ZmqError| TrainerError::Zmq(e.to_string());
    let port = |ep: zeromq::Endpoint| match ep {
        zeromq::Endpoint::Tcp(_, p) => Ok(p),
        other => Err(TrainerError::Zmq(format!("unexpected endpoint {other}"))),
    };
    let mut sub = zeromq::SubSocket::new();
    let publish_port = port(sub.bind("tcp://127.0.0.1:0").await.map_err(err)?)?;
    sub.subscribe("").await.map_err(err)?;
    let mut ctl = zeromq::PubSocket::new();
    let controller_port = port(ctl.bind("tcp://127.0.0.1:0").await.map_err(err)?)?;
    Ok((sub, ctl, publish_port, controller_port))
}

enum Out {
    Bytes(Stream, Vec<u8>),
    Eof(Stream),
}

fn pump<R: Runtime>(mut r: ChildPipe, s: Stream, tx: mpsc::Sender<Out>) {
    R::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(Out::Bytes(s, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Out::Eof(s)).await;
    });
}

/// Runs `sleap-nn train`. `args(publish_port, controller_port)` builds the argv once the ports are
/// known. `interrupt` carries the user's stop/cancel; events go to `events`. Returns when the
/// process has exited and its output is drained.
pub async fn run_train<R: Runtime>(
    launch: &Launch,
    args: impl FnOnce(u16, u16) -> Vec<String>,
    sup: &Supervision,
    mut interrupt: InterruptRx,
    events: EventTx,
) -> Result<Exit, TrainerError> {
    // zeromq's transport is tokio's: its futures run under `tokio_compat`.
    let (sub, ctl, publish_port, controller_port) = R::tokio_compat(bind_zmq()).await?;
    let argv = args(publish_port, controller_port);
    let mut child = R::spawn_process(command(launch, &argv))
        .map_err(|source| TrainerError::Spawn { program: launch.program.display().to_string(), source })?;
    let pid = child.id();
    tracing::info!(pid, publish_port, controller_port, "sleap-nn train started");
    if let Some(p) = pid {
        let _ = events.send(TrainerEvent::Spawned(p));
    }
    let (zmq_tx, mut zmq_rx) = mpsc::channel::<String>(256);
    let zmq_task = crate::spawn_abortable::<R, _>(R::tokio_compat(async move {
        let mut sub = sub;
        while let Ok(m) = sub.recv().await {
            let text = m.iter().next().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            if zmq_tx.send(text).await.is_err() {
                break;
            }
        }
    }));
    // The control socket lives in its own task too, so that every send runs under the tokio
    // reactor; a send completes when the message is queued.
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<&'static str>(4);
    let ctl_task = crate::spawn_abortable::<R, _>(R::tokio_compat(async move {
        let mut ctl = ctl;
        while let Some(m) = ctl_rx.recv().await {
            let _ = ctl.send(zeromq::ZmqMessage::from(m)).await;
        }
    }));
    let mut sv = Supervisor::<R>::new(launch, sup, pid, events, &mut child);
    let mut relay = ProgressRelay::new(sup.batch_every);
    let mut reports = sleap_rtc_core::job::bridge::ReportThrottle::new(sup.batch_every);
    let start = Instant::now();
    let mut next_stop_send: Option<Instant> = None;
    let mut sigint_at: Option<Instant> = None;
    let mut status = None;
    let mut exited: Option<Instant> = None;
    loop {
        let now = start.elapsed();
        let mut wake = sv.poll_at();
        for t in
            [relay.poll_at(), next_stop_send.map(|t| t - start), sigint_at.map(|t| t - start)].into_iter().flatten()
        {
            wake = Some(wake.map_or(t, |w: Duration| w.min(t)));
        }
        let mut sleep_for = wake.map_or(Duration::from_secs(3600), |w| w.saturating_sub(now));
        sleep_for = sleep_for.min(sv.kill_in().unwrap_or(sleep_for));
        if exited.is_some() {
            sleep_for = sleep_for.min(Duration::from_millis(200));
        }
        if status.is_some() && sv.drain_over(exited) {
            break;
        }
        tokio::select! {
            m = zmq_rx.recv() => {
                if let Some(text) = m {
                    for p in relay.on_message(&text, start.elapsed()) {
                        sv.progress(p);
                    }
                    if reports.pass(&text, start.elapsed()) {
                        let _ = sv.events.send(TrainerEvent::Report(text));
                    }
                }
            }
            o = sv.out_rx.recv(), if !sv.eof_both() => sv.output(o, start.elapsed()),
            r = interrupt.changed() => {
                if r.is_err() { continue; }
                let what = *interrupt.borrow_and_update();
                match what {
                    Some(Interrupt::Stop) if next_stop_send.is_none() && !sv.cancelling() => {
                        next_stop_send = Some(Instant::now());
                        sigint_at = Some(Instant::now() + sup.stop_sigint_after);
                    }
                    Some(Interrupt::Cancel) => sv.cancel(),
                    _ => {}
                }
            }
            st = sv.child.wait(), if status.is_none() => {
                status = Some(st);
                exited = Some(Instant::now());
                // A last ZMQ message (train_end) may still be in flight; sleap-nn lingers 1 s.
                let deadline = Instant::now() + Duration::from_millis(300);
                while let Ok(Some(text)) = crate::timeout_at::<R, _>(deadline, zmq_rx.recv()).await {
                    for p in relay.on_message(&text, start.elapsed()) {
                        sv.progress(p);
                    }
                    if reports.pass(&text, start.elapsed()) {
                        let _ = sv.events.send(TrainerEvent::Report(text));
                    }
                }
            }
            _ = crate::sleep::<R>(sleep_for) => {}
        }
        let now = start.elapsed();
        if let Some(p) = relay.poll(now) {
            sv.progress(p);
        }
        sv.tick(now);
        if relay.train_end {
            next_stop_send = None;
            sigint_at = None;
        }
        if let Some(t) = next_stop_send {
            if Instant::now() >= t && status.is_none() {
                // Always a JSON object: a bare string crashes sleap-nn's controller.
                let _ = ctl_tx.try_send(r#"{"command": "stop"}"#);
                next_stop_send = Some(Instant::now() + sup.stop_resend);
            }
        }
        if let Some(t) = sigint_at {
            if Instant::now() >= t && status.is_none() {
                tracing::warn!(pid, "no train_end after a stop; sending SIGINT");
                signal_group(pid, libc::SIGINT);
                sigint_at = None;
            }
        }
    }
    zmq_task.abort();
    ctl_task.abort();
    let st = status.and_then(|s| s.ok());
    let mut exit = sv.finish(st);
    exit.train_end = relay.train_end;
    Ok(exit)
}

/// Runs `sleap-nn predict --gui` (or any inference argv): JSON lines on stdout become progress,
/// an `{"error": true, ...}` line becomes the failure message.
pub async fn run_predict<R: Runtime>(
    launch: &Launch,
    argv: &[String],
    sup: &Supervision,
    mut interrupt: InterruptRx,
    events: EventTx,
) -> Result<Exit, TrainerError> {
    let mut child = R::spawn_process(command(launch, argv))
        .map_err(|source| TrainerError::Spawn { program: launch.program.display().to_string(), source })?;
    let pid = child.id();
    tracing::info!(pid, "sleap-nn predict started");
    if let Some(p) = pid {
        let _ = events.send(TrainerEvent::Spawned(p));
    }
    let _ = events.send(TrainerEvent::Progress(Progress::Started { model: None }));
    let mut sv = Supervisor::<R>::new(launch, sup, pid, events, &mut child);
    sv.json_stdout = true;
    let start = Instant::now();
    let mut status = None;
    let mut exited: Option<Instant> = None;
    loop {
        if status.is_some() && sv.drain_over(exited) {
            break;
        }
        let mut sleep_for = sv.poll_at().map_or(Duration::from_secs(3600), |w| w.saturating_sub(start.elapsed()));
        sleep_for = sleep_for.min(sv.kill_in().unwrap_or(sleep_for));
        if exited.is_some() {
            sleep_for = sleep_for.min(Duration::from_millis(200));
        }
        tokio::select! {
            o = sv.out_rx.recv(), if !sv.eof_both() => sv.output(o, start.elapsed()),
            r = interrupt.changed() => {
                if r.is_err() { continue; }
                if interrupt.borrow_and_update().is_some() {
                    sv.cancel();
                }
            }
            st = sv.child.wait(), if status.is_none() => {
                status = Some(st);
                exited = Some(Instant::now());
            }
            _ = crate::sleep::<R>(sleep_for) => {}
        }
        sv.tick(start.elapsed());
    }
    let st = status.and_then(|s| s.ok());
    Ok(sv.finish(st))
}

/// The parts common to both kinds of run: output pumping, the log file, cancel escalation.
struct Supervisor<'a, R: Runtime> {
    child: &'a mut R::Child,
    pid: Option<u32>,
    events: mpsc::UnboundedSender<TrainerEvent>,
    out_rx: mpsc::Receiver<Out>,
    eof: [bool; 2],
    logs: [LogCoalescer; 2],
    log_file: Option<std::fs::File>,
    json_stdout: bool,
    error: Option<String>,
    stderr_tail: std::collections::VecDeque<String>,
    kill_at: Option<Instant>,
    cancel_grace: Duration,
    /// Partial stdout line when stdout carries JSON lines.
    json_buf: Vec<u8>,
}

impl<'a, R: Runtime> Supervisor<'a, R> {
    fn new(
        launch: &Launch,
        sup: &Supervision,
        pid: Option<u32>,
        events: mpsc::UnboundedSender<TrainerEvent>,
        child: &'a mut R::Child,
    ) -> Self {
        let (tx, out_rx) = mpsc::channel(64);
        if let Some(o) = child.take_stdout() {
            pump::<R>(o, Stream::Stdout, tx.clone());
        }
        if let Some(e) = child.take_stderr() {
            pump::<R>(e, Stream::Stderr, tx);
        }
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&launch.log_file).ok();
        Supervisor {
            child,
            pid,
            events,
            out_rx,
            eof: [false; 2],
            logs: [
                LogCoalescer::new(Stream::Stdout, sup.redraw_every),
                LogCoalescer::new(Stream::Stderr, sup.redraw_every),
            ],
            log_file,
            json_stdout: false,
            error: None,
            stderr_tail: Default::default(),
            kill_at: None,
            cancel_grace: sup.cancel_grace,
            json_buf: Vec::new(),
        }
    }

    fn eof_both(&self) -> bool {
        self.eof[0] && self.eof[1]
    }

    fn cancelling(&self) -> bool {
        self.kill_at.is_some()
    }

    fn progress(&self, p: Progress) {
        let _ = self.events.send(TrainerEvent::Progress(p));
    }

    fn line(&mut self, l: LogLine) {
        if l.stream == Stream::Stderr && !l.cr {
            if self.stderr_tail.len() == 20 {
                self.stderr_tail.pop_front();
            }
            self.stderr_tail.push_back(l.text.clone());
        }
        let _ = self.events.send(TrainerEvent::Log(l));
    }

    fn output(&mut self, o: Option<Out>, now: Duration) {
        match o {
            None => self.eof = [true, true],
            Some(Out::Eof(s)) => {
                let i = s as usize;
                self.eof[i] = true;
                if let Some(l) = self.logs[i].finish() {
                    self.line(l);
                }
            }
            Some(Out::Bytes(s, b)) => {
                if let Some(f) = self.log_file.as_mut() {
                    let _ = f.write_all(&b);
                }
                if s == Stream::Stdout && self.json_stdout {
                    self.json_lines(&b, now);
                    return;
                }
                let lines = self.logs[s as usize].push(&b, now);
                for l in lines {
                    self.line(l);
                }
            }
        }
    }

    fn json_lines(&mut self, b: &[u8], now: Duration) {
        self.json_buf.extend_from_slice(b);
        while let Some(i) = self.json_buf.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = self.json_buf.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line).trim().to_owned();
            match parse_inference_line(&text) {
                InferenceLine::Progress(p) => self.progress(p),
                InferenceLine::Error { kind, message } => {
                    self.error = Some(format!("{kind}: {message}"));
                    self.line(LogLine { stream: Stream::Stdout, text, cr: false });
                }
                InferenceLine::Text => {
                    for l in self.logs[0].push(&line, now) {
                        self.line(l);
                    }
                }
            }
        }
        if self.json_buf.len() > 64 * 1024 {
            self.json_buf.clear();
        }
    }

    fn poll_at(&self) -> Option<Duration> {
        self.logs.iter().filter_map(LogCoalescer::poll_at).min()
    }

    /// How long until the SIGKILL of a cancel is due (so the loop wakes for it).
    fn kill_in(&self) -> Option<Duration> {
        self.kill_at.map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// After the process exits, its output is drained for at most this long: a grandchild that
    /// keeps the pipes open must not keep the job (and the worker) busy forever.
    fn drain_over(&self, exited: Option<Instant>) -> bool {
        self.eof_both() || exited.is_some_and(|t| t.elapsed() > Duration::from_secs(3))
    }

    fn tick(&mut self, now: Duration) {
        for i in 0..2 {
            if let Some(l) = self.logs[i].poll(now) {
                self.line(l);
            }
        }
        if let Some(t) = self.kill_at {
            if Instant::now() >= t {
                tracing::warn!(pid = self.pid, "still running after SIGTERM; sending SIGKILL");
                signal_group(self.pid, libc::SIGKILL);
                self.kill_at = Some(Instant::now() + Duration::from_secs(3600));
            }
        }
    }

    fn cancel(&mut self) {
        if self.kill_at.is_none() {
            signal_group(self.pid, libc::SIGTERM);
            self.kill_at = Some(Instant::now() + self.cancel_grace);
        }
    }

    fn finish(mut self, status: Option<std::process::ExitStatus>) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        for i in 0..2 {
            if let Some(l) = self.logs[i].finish() {
                self.line(l);
            }
        }
        // A cancelled run must leave nothing behind (a DDP re-spawn shares the group). Not done
        // otherwise: the leader is reaped, and its pid could in principle be reused.
        if self.kill_at.is_some() || !self.eof_both() {
            signal_group(self.pid, libc::SIGKILL);
        }
        Exit {
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            train_end: false,
            error: self.error,
            stderr_tail: self.stderr_tail.into_iter().collect(),
        }
    }
}

/// `sleap-nn --version`, e.g. `0.3.5`; `None` if it cannot be run.
pub async fn sleap_nn_version<R: Runtime>(program: &Path) -> Option<String> {
    let mut cmd = std::process::Command::new(program);
    cmd.arg("--version");
    let (status, stdout) = crate::output::<R>(cmd, Duration::from_secs(60)).await?;
    let text = String::from_utf8_lossy(&stdout);
    status.success().then(|| text.trim().trim_start_matches("sleap-nn").trim().to_owned()).filter(|v| !v.is_empty())
}
