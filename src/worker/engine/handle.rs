//! The engine as the HTTP side holds it: the handle (`Engine`) whose calls
//! become commands down the engine thread's channel, what a request carries
//! in (`Submission`) and what comes back (`Tokenized`, `Described`), and the
//! load counters admission reads.

use super::*;

/// Counters the HTTP side reads for `/v1/ready` and admission.
#[derive(Debug, Default)]
pub struct Load {
    /// Requests accepted and not yet finished: running plus queued.
    in_flight: AtomicU32,
    /// Slots holding a request, as of the last step.
    pub(super) busy: AtomicU32,
    /// Idle conversations in the prompt cache, and their tokens.
    pub(super) cached_sequences: AtomicU32,
    pub(super) cached_tokens: AtomicU64,
}

impl Load {
    pub fn busy(&self) -> u32 {
        self.busy.load(Ordering::Relaxed)
    }

    pub fn cached(&self) -> (u32, u64) {
        (
            self.cached_sequences.load(Ordering::Relaxed),
            self.cached_tokens.load(Ordering::Relaxed),
        )
    }

    pub fn queued(&self) -> u32 {
        self.in_flight
            .load(Ordering::Relaxed)
            .saturating_sub(self.busy())
    }
}

/// A place among the running and queued requests; giving it back (dropping it)
/// happens exactly once per request, whichever way the request ends.
#[derive(Debug)]
pub struct Reservation(Arc<Load>);

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request on its way to the engine.
pub struct Submission {
    /// When it has `messages`, they are the prompt and `request.prompt` is ignored.
    pub request: crate::protocol::InferenceRequest,
    /// Where the request's events go; closed when the client has gone away.
    pub events: mpsc::UnboundedSender<InferenceEvent>,
    pub reservation: Reservation,
}

/// The answer to a submission once its prompt is tokenized and checked: the
/// prompt's length in tokens.
pub type Admission = oneshot::Receiver<Result<u32, ApiError>>;

/// Vectors for texts, one each, and the tokens they were made of.
pub type Embedded = Result<(Vec<Vec<f32>>, u32), ApiError>;

pub(super) enum Command {
    Submit(Box<Submission>, oneshot::Sender<Result<u32, ApiError>>),
    Embed(Vec<String>, oneshot::Sender<Embedded>),
    Tokenize(ToTokenize, oneshot::Sender<Result<Tokenized, ApiError>>),
    Detokenize(Vec<i32>, oneshot::Sender<Result<Vec<u8>, ApiError>>),
    Describe(oneshot::Sender<Described>),
    Shutdown,
}

/// What `/tokenize` asks for: a text, or chat messages and tools rendered as a
/// request's prompt would be (what Anthropic's `count_tokens` counts).
#[derive(Debug, Clone)]
pub enum ToTokenize {
    Text {
        content: String,
        /// The model's BOS (and such) added, as a prompt gets them.
        add_special: bool,
        /// Special tokens written out in the text are those tokens.
        parse_special: bool,
    },
    Chat {
        messages: Vec<crate::protocol::ChatMessage>,
        tools: Vec<crate::protocol::Tool>,
    },
}

/// Tokens, each with the bytes it stands for.
#[derive(Debug, Clone, Default)]
pub struct Tokenized {
    pub ids: Vec<i32>,
    pub pieces: Vec<Vec<u8>>,
}

/// The engine as llama-server's `/props` and `/slots` show it.
#[derive(Debug, Clone, Default)]
pub struct Described {
    /// Tokens of context per slot.
    pub n_ctx: u32,
    pub n_vocab: i32,
    /// The model's own chat template (`tokenizer.chat_template`), if any.
    pub chat_template: String,
    /// Per slot: `None` idle, else the request's prompt tokens and tokens generated.
    pub slots: Vec<Option<(u32, u32)>>,
}

/// The handle the HTTP side holds. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    commands: std_mpsc::Sender<Command>,
    load: Arc<Load>,
    /// Read by llama.cpp's load-progress callback: returning false aborts loading.
    stopping: Arc<AtomicBool>,
    capacity: u32,
}

impl Engine {
    /// Starts the engine thread. It loads the model, reporting on `progress`,
    /// then serves until [`Engine::shutdown`]. The handle joins the thread.
    /// Starts the engine thread, which runs `first` before it loads the model.
    pub fn start(
        config: Config,
        first: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<(
        Engine,
        watch::Receiver<LoadingEvent>,
        std::thread::JoinHandle<()>,
    )> {
        let layers_total = crate::gguf::layer_count(&config.model_path).unwrap_or(0);
        let (progress, loading) = watch::channel(progress_event(&config, layers_total, 0.0, 0));
        let (commands, rx) = std_mpsc::channel();
        let load = Arc::new(Load::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let engine = Engine {
            commands,
            load: load.clone(),
            stopping: stopping.clone(),
            capacity: config.slots + config.queue_size,
        };
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                first();
                let run = std::panic::AssertUnwindSafe(|| {
                    let (backend, model) = load_model(&config, layers_total, &progress, &stopping)?;
                    serve(&config, &backend, &model, &rx, &load, &progress)
                });
                // A failure after loading (or a panic) also ends in `Failed`, which
                // the worker takes as the signal to exit non-zero.
                let failed = match std::panic::catch_unwind(run) {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e,
                    Err(_) => "the engine thread panicked".to_string(),
                };
                tracing::error!("{failed}");
                progress.send_replace(LoadingEvent::Failed { message: failed });
            })?;
        Ok((engine, loading, thread))
    }

    pub fn load(&self) -> &Load {
        &self.load
    }

    /// Takes a place for a new request, or `None` when slots and queue are full.
    pub fn reserve(&self) -> Option<Reservation> {
        let taken = self
            .load
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.capacity).then_some(n + 1)
            });
        taken.ok().map(|_| Reservation(self.load.clone()))
    }

    /// Hands a request to the engine. The admission resolves once the prompt
    /// is checked; it fails (the sender dropped) if the engine has stopped.
    pub fn submit(&self, submission: Submission) -> Admission {
        let (tx, rx) = oneshot::channel();
        let _ = self
            .commands
            .send(Command::Submit(Box::new(submission), tx));
        rx
    }

    /// Embeds texts between two decode steps, on a context of its own.
    pub fn embed(&self, texts: Vec<String>) -> oneshot::Receiver<Embedded> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Embed(texts, tx));
        rx
    }

    /// Tokens of a text or of chat messages.
    pub fn tokenize(&self, what: ToTokenize) -> oneshot::Receiver<Result<Tokenized, ApiError>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Tokenize(what, tx));
        rx
    }

    /// The bytes of a run of tokens.
    pub fn detokenize(&self, ids: Vec<i32>) -> oneshot::Receiver<Result<Vec<u8>, ApiError>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Detokenize(ids, tx));
        rx
    }

    /// What the engine runs: context, vocabulary, template, slots.
    pub fn describe(&self) -> oneshot::Receiver<Described> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Describe(tx));
        rx
    }

    /// Ends every stream with `CANCELLED`, aborts a load in progress, stops the thread.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.commands.send(Command::Shutdown);
    }
}
