//! The management commands and the config file, as a new user meets them: real `sleap-rtc`
//! processes against a real signaling server on 127.0.0.1, each user with config and data
//! directories of their own and no SLEAP_RTC_* variables unless a test sets one.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// A user of the CLI: their own config and data directories, a working directory, and nothing
/// from the test's environment.
struct User {
    home: PathBuf,
    cwd: PathBuf,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
    fn ok(self) -> Out {
        assert_eq!(self.code, 0, "stdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }
}

impl User {
    fn new(env: &Env, name: &str) -> User {
        let home = env.path(name);
        let cwd = home.join("project");
        std::fs::create_dir_all(&cwd).unwrap();
        User { home, cwd }
    }

    async fn run_env(&self, args: &[&str], vars: &[(&str, &str)]) -> Out {
        let mut c = tokio::process::Command::new(BIN);
        c.args(args)
            .current_dir(&self.cwd)
            .env("SLEAP_RTC_CONFIG_DIR", self.home.join("cfg"))
            .env("SLEAP_RTC_DATA_HOME", self.home.join("data"))
            .env("HOME", &self.home)
            .stdin(std::process::Stdio::null());
        for (k, _) in std::env::vars() {
            if k.starts_with("SLEAP_RTC_") || k == "SLEAP_NN" {
                c.env_remove(k);
            }
        }
        for (k, v) in vars {
            c.env(k, v);
        }
        let o = tokio::time::timeout(std::time::Duration::from_secs(60), c.output()).await.expect("timed out").unwrap();
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    async fn run(&self, args: &[&str]) -> Out {
        self.run_env(args, &[]).await
    }

    fn user_config(&self) -> PathBuf {
        self.home.join("cfg/config.toml")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_makes_the_server_and_a_new_room_the_defaults() {
    let env = env().await;
    let alice = User::new(&env, "alice");

    let o = alice.run(&["workers"]).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("no server") && o.stderr.contains("login --server"), "{}", o.stderr);

    alice.run(&["login", "--server", &env.url]).await.ok();
    let me = alice.run(&["whoami", "--json"]).await.ok().json();
    assert_eq!(me["server"], env.url.as_str());
    assert_eq!(me["credential"], "JWT");
    assert!(me["expires_at"].as_i64().unwrap() > 0);

    let o = alice.run(&["workers"]).await;
    assert!(o.stderr.contains("no room") && o.stderr.contains("set-default"), "{}", o.stderr);

    let room = alice.run(&["room", "create", "--name", "lab"]).await.ok().stdout.trim().to_owned();
    let cfg = std::fs::read_to_string(alice.user_config()).unwrap();
    assert!(cfg.contains(&format!("room = \"{room}\"")) && cfg.contains(&env.url), "{cfg}");
    // A second room does not take the default away.
    let other = alice.run(&["room", "create", "--name", "other"]).await.ok();
    assert!(other.stderr.contains("room set-default"), "{}", other.stderr);
    let rooms = alice.run(&["room", "list", "--json"]).await.ok().json();
    assert_eq!(rooms.as_array().unwrap().len(), 2);
    let text = alice.run(&["room", "list"]).await.ok().stdout;
    assert!(text.contains(&format!("{room}*")) && text.contains("owner"), "{text}");
    let info = alice.run(&["room", "info", "--json"]).await.ok().json();
    assert_eq!(info["room_id"], room.as_str());
    assert_eq!(info["name"], "lab");

    // `workers` now needs neither --server nor --room.
    let o = alice.run(&["workers", "--json"]).await.ok();
    assert_eq!(o.json(), serde_json::json!([]));

    // The project file beats the user's; the environment beats both; a flag beats everything.
    std::fs::write(alice.cwd.join("sleap-rtc.toml"), "room = \"from-project\"\n").unwrap();
    let show = alice.run(&["config", "show", "--json"]).await.ok().json();
    assert_eq!(show["room"]["value"], "from-project");
    assert_eq!(show["room"]["source"], "project");
    assert_eq!(show["server"]["source"], "user");
    let show = alice.run_env(&["config", "show", "--json"], &[("SLEAP_RTC_ROOM", "from-env")]).await.ok().json();
    assert_eq!(show["room"]["value"], "from-env");
    assert_eq!(show["room"]["source"], "env SLEAP_RTC_ROOM");
    let o = alice.run(&["room", "info", &room, "--json"]).await.ok();
    assert_eq!(o.json()["room_id"], room.as_str());
    // A typo in a config file is an error that names it, not a silent no-op.
    std::fs::write(alice.cwd.join("sleap-rtc.toml"), "rom = \"x\"\n").unwrap();
    let o = alice.run(&["workers"]).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("sleap-rtc.toml") && o.stderr.contains("rom"), "{}", o.stderr);
    std::fs::remove_file(alice.cwd.join("sleap-rtc.toml")).unwrap();

    let st = alice.run(&["status", "--json"]).await.ok().json();
    assert_eq!(st["room"], room.as_str());
    assert_eq!(st["credentials_private"], true);
    let masked = st["logins"][0]["masked"].as_str().unwrap();
    assert!(masked.contains('…') && masked.len() < 20, "{masked}");

    alice.run(&["logout"]).await.ok();
    let o = alice.run(&["whoami"]).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("not logged in"), "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invites_tokens_and_keys_from_the_command_line() {
    let env = env().await;
    let alice = User::new(&env, "alice");
    let bob = User::new(&env, "bob");
    alice.run(&["login", "--server", &env.url]).await.ok();
    bob.run(&["login", "--server", &env.url]).await.ok();
    let room = alice.run(&["room", "create", "--name", "shared"]).await.ok().stdout.trim().to_owned();

    let code = alice.run(&["room", "invite"]).await.ok().stdout.trim().to_owned();
    assert!(!code.is_empty());
    let joined = bob.run(&["room", "join", &code]).await.ok();
    assert_eq!(joined.stdout.trim(), room);
    assert!(std::fs::read_to_string(bob.user_config()).unwrap().contains(&room), "bob's default room");
    let o = bob.run(&["room", "join", &code]).await;
    assert_ne!(o.code, 0, "an invite is single use");
    let members = alice.run(&["room", "members", "--json"]).await.ok().json();
    let roles: Vec<&str> = members.as_array().unwrap().iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles.len(), 2, "{members}");
    assert!(roles.contains(&"owner") && roles.contains(&"member"));
    // Deleting asks first; without a terminal it refuses unless told --yes.
    let o = bob.run(&["room", "delete", &room]).await;
    assert!(o.code != 0 && o.stderr.contains("--yes"), "{}", o.stderr);

    let secret = alice.run(&["token", "create", "--name", "gpu-1"]).await.ok().stdout.trim().to_owned();
    assert!(secret.starts_with("slp_"), "{secret}");
    let tokens = alice.run(&["token", "list", "--json"]).await.ok().json();
    let t = &tokens.as_array().unwrap()[0];
    assert_eq!(t["worker_name"], "gpu-1");
    assert_eq!(t["is_active"], true);
    let id = t["id"].as_str().unwrap().to_owned();
    assert!(!secret.contains(&id) || id.len() < secret.len(), "the list shows ids, not secrets");
    alice.run(&["token", "revoke", &id]).await.ok();
    let tokens = alice.run(&["token", "list", "--json", "--active-only"]).await.ok().json();
    assert_eq!(tokens, serde_json::json!([]));
    let text = alice.run(&["token", "list"]).await.ok().stdout;
    assert!(text.contains("revoked"), "{text}");
    alice.run(&["token", "delete", &id]).await.ok();
    assert_eq!(alice.run(&["token", "list", "--json"]).await.ok().json(), serde_json::json!([]));
    let o = alice.run(&["token", "revoke", "../rooms"]).await;
    assert!(o.code != 0 && o.stderr.contains("not an id"), "{}", o.stderr);

    let key = alice.run(&["key", "create", "--name", "ci", "--save"]).await.ok().stdout.trim().to_owned();
    assert!(key.starts_with("slp_acct_"), "{key}");
    let me = alice.run(&["whoami", "--json"]).await.ok().json();
    assert_eq!(me["credential"], "account key", "--save stored the key");
    let keys = alice.run(&["key", "list", "--json"]).await.ok().json();
    let kid = keys[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(keys[0]["name"], "ci");
    // The key signs in until it is revoked (revoking with the key itself, the only credential).
    alice.run(&["key", "revoke", &kid]).await.ok();
    let o = alice.run(&["whoami"]).await;
    assert_ne!(o.code, 0, "a revoked key is refused: {}", o.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_says_what_works_and_what_does_not() {
    let env = env().await;
    let alice = User::new(&env, "alice");
    // Nothing set up: the server check fails, and the exit code says so.
    let o = alice.run(&["doctor", "--json"]).await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    let r = o.json();
    assert_eq!(r["ok"], false);
    assert_eq!(r["checks"][1]["name"], "server");
    assert_eq!(r["checks"][1]["verdict"], "fail");

    alice.run(&["login", "--server", &env.url]).await.ok();
    alice.run(&["room", "set-default", &env.room]).await.ok();
    // alice is not a member of env's room: joining it fails, and doctor says which step.
    let r = alice.run(&["doctor", "--json"]).await.json();
    let verdict = |r: &Value, name: &str| {
        r["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).map(|c| c["verdict"].clone())
    };
    assert_eq!(verdict(&r, "server"), Some("ok".into()), "{r:#}");
    assert_eq!(verdict(&r, "login"), Some("ok".into()), "{r:#}");
    assert_eq!(verdict(&r, "credentials file"), Some("ok".into()), "{r:#}");
    assert_eq!(verdict(&r, "room"), Some("fail".into()), "{r:#}");

    let room = alice.run(&["room", "create", "--name", "mine"]).await.ok().stdout.trim().to_owned();
    alice.run(&["room", "set-default", &room]).await.ok();
    let mounts = alice.home.join("data-mount");
    std::fs::create_dir_all(&mounts).unwrap();
    alice.run(&["config", "add-mount", mounts.to_str().unwrap()]).await.ok();
    let fake = env.fake.display().to_string();
    let o = alice.run(&["doctor", "--worker", "--sleap-nn", &fake, "--json"]).await;
    let r = o.json();
    assert_eq!(verdict(&r, "room"), Some("ok".into()), "{r:#}");
    assert_eq!(verdict(&r, "workers"), Some("warn".into()), "no worker online is a warning: {r:#}");
    assert_eq!(verdict(&r, "sleap-nn"), Some("ok".into()), "{r:#}");
    assert_eq!(verdict(&r, "mounts"), Some("ok".into()), "{r:#}");
    assert_eq!(verdict(&r, "work dir"), Some("ok".into()), "{r:#}");
    assert_eq!(o.code, 0, "warnings only: {r:#}");
    let text = alice.run(&["doctor"]).await.stdout;
    assert!(text.contains("[ok  ] server") && text.contains("all checks passed"), "{text}");

    // A readable-by-others credentials file is a failure, with the fix.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(alice.home.join("cfg/credentials.json"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = alice.run(&["doctor"]).await;
    assert_eq!(o.code, 1);
    assert!(o.stdout.contains("chmod 600"), "{}", o.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_edits_and_completions() {
    let env = env().await;
    let u = User::new(&env, "u");
    std::fs::create_dir_all(u.home.join("cfg")).unwrap();
    std::fs::write(u.user_config(), "# my settings\n[worker]\ndevice = \"cpu\"  # no GPU here\n").unwrap();
    u.run(&["config", "set", "worker.name", "lab-box"]).await.ok();
    u.run(&["config", "set", "worker.upload_cache_gb", "5"]).await.ok();
    let o = u.run(&["config", "set", "worker.upload_cache_gb", "five"]).await;
    assert!(o.code != 0 && o.stderr.contains("whole number"), "{}", o.stderr);
    let o = u.run(&["config", "set", "sever", "x"]).await;
    assert!(o.code != 0 && o.stderr.contains("unknown key") && o.stderr.contains("server"), "{}", o.stderr);
    let o = u.run(&["config", "add-mount", "/does/not/exist"]).await;
    assert!(o.code != 0 && o.stderr.contains("not a directory"), "{}", o.stderr);
    u.run(&["config", "add-path-mapping", "/Volumes/lab", "/mnt/lab", "--project"]).await.ok();
    let text = std::fs::read_to_string(u.user_config()).unwrap();
    assert!(text.contains("# my settings") && text.contains("# no GPU here"), "comments kept: {text}");
    assert!(text.contains("name = \"lab-box\""), "{text}");
    let project = std::fs::read_to_string(u.cwd.join("sleap-rtc.toml")).unwrap();
    assert!(project.contains("/mnt/lab"), "{project}");
    let show = u.run(&["config", "show", "--json"]).await.ok().json();
    assert_eq!(show["worker.device"]["value"], "cpu");
    assert_eq!(show["worker.upload_cache_gb"]["value"], "5");
    assert_eq!(show["path_mappings"]["source"], "project");
    let paths = u.run(&["config", "path"]).await.ok().stdout;
    assert!(paths.contains("project") && paths.contains("exists"), "{paths}");
    u.run(&["config", "unset", "worker.name"]).await.ok();
    assert!(!std::fs::read_to_string(u.user_config()).unwrap().contains("lab-box"));

    for shell in ["bash", "zsh", "fish"] {
        let o = u.run(&["completions", shell]).await.ok();
        assert!(o.stdout.contains("sleap-rtc") && o.stdout.contains("set-default"), "{shell}");
    }
}

/// A file under a path mapping is named to the worker by its worker path, not uploaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_mappings_send_worker_paths_instead_of_uploading() {
    let env = env().await;
    let share = env.path("share");
    std::fs::create_dir_all(&share).unwrap();
    let labels = share.join("labels.pkg.slp");
    std::fs::copy(asset("labels.pkg.slp"), &labels).unwrap();
    let share_s = share.display().to_string();
    let _w = env.worker("w", &["--mount", &share_s], "").await;
    // The client sees the share as /Volumes/share; the worker as `share`.
    let client_view = Path::new("/Volumes/share");
    std::fs::create_dir_all(env.path("cfg")).unwrap();
    std::fs::write(
        env.path("cfg/config.toml"),
        format!("[[path_mappings]]\nlocal = \"{}\"\nworker = \"{share_s}\"\n", client_view.display()),
    )
    .unwrap();
    let cfg = env.config("cfg.yaml", "");
    let mut args = env.train_args(&cfg, "out");
    let i = args.iter().position(|a| a == "--labels").unwrap();
    args[i + 1] = client_view.join("labels.pkg.slp").display().to_string();
    let (code, events, err) = Client::spawn(&env, &args).finish(60).await;
    assert_eq!(code, 0, "{err}\n{events:#?}");
    assert!(err.contains("path mapping") && err.contains("not uploaded"), "{err}");
    assert!(
        event(&events, "uploaded").is_none_or(|u| u["bytes"] == 0 && u["resumed_bytes"] == 0),
        "nothing was uploaded: {events:#?}"
    );
    assert_eq!(done(&events)["state"], "completed");
}
