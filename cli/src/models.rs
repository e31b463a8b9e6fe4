//! `sleap-rtc models`: the room's model registry (see `sleap_rtc_tokio::registry`).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::config::Settings;
use clap::{Args, Subcommand};
use sleap_rtc_core::registry::{ModelEntry, Op};
use sleap_rtc_tokio::registry::{self as reg, AnyStore, PublishInfo};

#[derive(Args, Clone)]
pub struct RegistryArgs {
    /// The registry: `s3://bucket/prefix` (AWS settings from the standard environment:
    /// AWS_ENDPOINT_URL, AWS_REGION, credentials) or a directory shared by the room's members.
    /// Default: `registry` in the config file.
    #[arg(long, env = "SLEAP_RTC_REGISTRY", value_name = "PATH")]
    pub registry: Option<String>,
    /// Room whose registry to use (default: the config file's `room`, see `room set-default`).
    #[arg(long, env = "SLEAP_RTC_ROOM")]
    pub room: Option<String>,
}

/// A registry and room, after the config file filled what the flags left out.
pub struct Reg {
    pub registry: String,
    pub room: String,
}

impl RegistryArgs {
    fn resolve(self) -> Result<Reg> {
        let s = Settings::load()?;
        let registry = self.registry.or_else(|| s.registry()).context(
            "no registry: pass --registry, set SLEAP_RTC_REGISTRY, or `sleap-rtc config set registry s3://bucket/prefix`",
        )?;
        Ok(Reg { registry, room: crate::room_or_default(self.room, &s)? })
    }
}

#[derive(Subcommand)]
pub enum ModelsCmd {
    /// Publish a trained run directory (best.ckpt + training_config.yaml) to the room.
    Push {
        #[command(flatten)]
        r: RegistryArgs,
        run_dir: PathBuf,
        #[arg(long)]
        alias: Option<String>,
        /// Repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// List the room's models.
    List {
        #[command(flatten)]
        r: RegistryArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show one model (by id, alias or id prefix).
    Show {
        #[command(flatten)]
        r: RegistryArgs,
        model: String,
    },
    /// Point an alias at a model.
    Alias {
        #[command(flatten)]
        r: RegistryArgs,
        model: String,
        name: String,
        /// Remove the alias instead.
        #[arg(long)]
        remove: bool,
    },
    /// Tag a model.
    Tag {
        #[command(flatten)]
        r: RegistryArgs,
        model: String,
        tag: String,
        /// Remove the tag instead.
        #[arg(long)]
        remove: bool,
    },
    /// Remove a model from the manifest (its files stay in the store).
    Rm {
        #[command(flatten)]
        r: RegistryArgs,
        model: String,
    },
    /// Download a model, verifying every file, into OUTDIR/<id>/.
    Pull {
        #[command(flatten)]
        r: RegistryArgs,
        model: String,
        #[arg(short = 'o', long = "output", value_name = "OUTDIR")]
        outdir: PathBuf,
    },
}

async fn store(r: &Reg) -> Result<AnyStore> {
    Ok(AnyStore::open(&r.registry).await?)
}

fn print_entry(e: &ModelEntry, aliases: &[&String]) {
    println!("{}  {}", e.id, e.model_type);
    if !aliases.is_empty() {
        println!("  aliases: {}", aliases.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", "));
    }
    if !e.tags.is_empty() {
        println!("  tags:    {}", e.tags.join(", "));
    }
    println!("  trained: {} by {} on {}", e.trained_at, e.trained_by, e.trained_on_worker);
    println!("  size:    {} bytes in {} files at {}", e.size_bytes, e.files.len(), e.s3_path);
    if !e.available_on_workers.is_empty() {
        println!("  cached on: {}", e.available_on_workers.join(", "));
    }
    if !e.notes.is_empty() {
        println!("  notes:   {}", e.notes);
    }
}

pub async fn run(cmd: ModelsCmd) -> Result<i32> {
    match cmd {
        ModelsCmd::Push { r, run_dir, alias, tags } => {
            let r = r.resolve()?;
            let s = store(&r).await?;
            let info = PublishInfo {
                trained_by: std::env::var("USER").unwrap_or_default(),
                dataset_hash: reg::dataset_hash(&run_dir),
                alias,
                tags,
                ..Default::default()
            };
            let e = reg::publish(&s, &r.room, &run_dir, info).await.context("publishing failed")?;
            println!("{}", e.id);
            eprintln!("published {} ({} bytes) to room {}", e.id, e.size_bytes, r.room);
        }
        ModelsCmd::List { r, json } => {
            let r = r.resolve()?;
            let m = reg::manifest(&store(&r).await?, &r.room).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
                return Ok(0);
            }
            if m.models.is_empty() {
                eprintln!("no models in room {}", r.room);
            }
            for e in m.models.values() {
                let aliases: Vec<&String> = m.aliases.iter().filter(|(_, v)| **v == e.id).map(|(k, _)| k).collect();
                let a = if aliases.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", aliases.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
                };
                println!(
                    "{}  {:<16} {:>10} B  {}{a}  {}",
                    e.id,
                    e.model_type,
                    e.size_bytes,
                    e.trained_at,
                    e.tags.join(",")
                );
            }
        }
        ModelsCmd::Show { r, model } => {
            let r = r.resolve()?;
            let m = reg::manifest(&store(&r).await?, &r.room).await?;
            let e = m.resolve(&model)?;
            let aliases: Vec<&String> = m.aliases.iter().filter(|(_, v)| **v == e.id).map(|(k, _)| k).collect();
            print_entry(e, &aliases);
        }
        ModelsCmd::Alias { r, model, name, remove } => {
            let r = r.resolve()?;
            let op = if remove { Op::RemoveAlias { alias: name } } else { Op::SetAlias { alias: name, id: model } };
            reg::update(&store(&r).await?, &r.room, vec![op]).await?;
        }
        ModelsCmd::Tag { r, model, tag, remove } => {
            let r = r.resolve()?;
            let op = if remove { Op::Untag { id: model, tag } } else { Op::Tag { id: model, tag } };
            reg::update(&store(&r).await?, &r.room, vec![op]).await?;
        }
        ModelsCmd::Rm { r, model } => {
            let r = r.resolve()?;
            reg::update(&store(&r).await?, &r.room, vec![Op::RemoveModel { id: model }]).await?;
        }
        ModelsCmd::Pull { r, model, outdir } => {
            let r = r.resolve()?;
            let (e, dir) = reg::pull(&store(&r).await?, &r.room, &model, &outdir).await?;
            eprintln!("pulled {} ({} files, verified)", e.id, e.files.len());
            println!("{}", dir.display());
        }
    }
    Ok(0)
}
