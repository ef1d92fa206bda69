//! The listener's side: rules matched against an event, recipients resolved with their
//! preferences, messages rendered before the transaction, log rows and one delivery job per
//! channel written in it; digests collected and closed.

use super::*;

/// Renders every template text of these rules over their contexts, on a blocking thread.
pub(super) async fn render_all(work: Vec<(RuleRow, Value)>) -> Result<Prerendered, BackendError> {
    if work.is_empty() {
        return Ok(Prerendered::default());
    }
    let renders = tokio::task::spawn_blocking(move || {
        let mut renders = Prerendered::default();
        for (rule, context) in &work {
            let texts = [rule.recipient.as_deref(), rule.digest_key.as_deref(), rule.subject.as_deref(), Some(rule.body.as_str())];
            for text in texts.into_iter().flatten() {
                renders.add(text, context, false);
            }
            if rule.channel == "email" {
                renders.add(&rule.body, context, true);
            }
        }
        renders
    })
    .await
    .map_err(|e| BackendError::Storage(Cause::new(format!("rendering stopped: {e}")).with_source(e)))?;
    Ok(renders)
}

impl Notifier {
    /// Matches the event's rules and writes a log row (and, for each that is to be sent, a
    /// delivery job) per notification. Runs in the listener's acknowledgement transaction.
    pub(super) fn fan_out(&self, tx: &mut dyn Tx, env: &EventEnvelope<Value>, renders: &Prerendered) -> Result<(), BackendError> {
        let rules = tx.query(RULES_SQL, &[env.event.as_str().into()])?;
        let now = now_ms();
        let mut jobs = Vec::new();
        for rule in rules.iter().filter_map(|r| RuleRow::matching(r, &env.payload)) {
            let mut context = event_context(env);
            let mut log = LogRow::new(&env.event, &env.event_id, rule.id, &rule.channel, now);
            let user = self.resolve(tx, &rule, &env.event, &env.payload, &mut context, &mut log, renders)?;
            if log.status == "pending" {
                if let Some(window) = rule.digest_window_ms {
                    // Collected: one message per (rule, recipient, key) when the window closes.
                    match renders.render(rule.digest_key.as_deref().unwrap_or(""), &context, false) {
                        Ok(key) => {
                            self.collect(tx, &rule, &log, key.trim(), window, env, now, &mut jobs)?;
                            continue;
                        }
                        Err(e) => log.fail(format!("digest key: {e}")),
                    }
                }
            }
            self.finish(tx, &rule, user.as_ref(), &context, &env.payload, log, now, &mut jobs, renders)?;
        }
        if !jobs.is_empty() {
            tx.enqueue(jobs)?;
        }
        Ok(())
    }

    /// Everything `fan_out` will render for this event, rendered now on a blocking thread: the
    /// same rules and contexts, read before the transaction (`fan_out` renders anything that
    /// changed in between itself).
    pub(super) async fn prerender(&self, backend: &dyn QueueBackend, env: &EventEnvelope<Value>) -> Result<Prerendered, BackendError> {
        let rules = backend.query(RULES_SQL, vec![env.event.as_str().into()]).await?;
        let mut work = Vec::new();
        for rule in rules.iter().filter_map(|r| RuleRow::matching(r, &env.payload)) {
            let mut context = event_context(env);
            if rule.recipient.is_none() {
                if let Some(id) = user_id_of(&env.payload) {
                    if let Some(user) = backend.query(USER_SQL, vec![id.into()]).await?.first().map(user_row) {
                        add_user(&mut context, &user);
                    }
                }
            }
            work.push((rule, context));
        }
        render_all(work).await
    }

    /// What `close_digest` will render, rendered now (as `prerender` does for `fan_out`): the
    /// digest as it stands, which is what it closes with unless an event joins it meanwhile.
    pub(super) async fn prerender_digest(&self, backend: &dyn QueueBackend, digest_id: &str) -> Result<Prerendered, BackendError> {
        let rows = backend
            .query(
                "SELECT rule_id, user_id, digest_key, events, count, first_event FROM notify_digests WHERE id = $1 AND status = 'open'",
                vec![digest_id.into()],
            )
            .await?;
        let Some(d) = rows.first() else { return Ok(Prerendered::default()) };
        let r = backend.query(DIGEST_RULE_SQL, vec![d.int(0).into()]).await?;
        let Some(r) = r.first() else { return Ok(Prerendered::default()) };
        let DigestParts { rule, last, mut context, .. } = DigestParts::of(d, r);
        if rule.recipient.is_none() {
            if let Some(id) = user_id_of(&last) {
                if let Some(user) = backend.query(USER_SQL, vec![id.into()]).await?.first().map(user_row) {
                    add_user(&mut context, &user);
                }
            }
        }
        render_all(vec![(rule, context)]).await
    }

    /// Who a rule's notification goes to: an expression or URL, or the payload's user (then
    /// their address and preferences apply). Sets the log's recipient or why it is held back.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn resolve(
        &self,
        tx: &mut dyn Tx,
        rule: &RuleRow,
        event: &str,
        payload: &Value,
        context: &mut Value,
        log: &mut LogRow,
        renders: &Prerendered,
    ) -> Result<Option<UserRow>, BackendError> {
        if let Some(expr) = &rule.recipient {
            match renders.render(expr, context, false) {
                Ok(to) => log.recipient = to.trim().to_string(),
                Err(e) => log.fail(format!("recipient: {e}")),
            }
            return Ok(None);
        }
        let Some(user) = user_of(tx, payload)? else {
            // A team alert: Slack without a recipient goes to the configured default webhook
            // (SPEC: `CONVEYOR_SLACK_WEBHOOK` needs no user).
            match (rule.channel.as_str(), self.config.slack_webhook.as_deref()) {
                ("slack", Some(default)) => log.recipient = default.to_string(),
                _ => log.skip("the payload names no known user (user_id)"),
            }
            return Ok(None);
        };
        log.user_id = Some(user.id);
        add_user(context, &user);
        match user.address(&rule.channel, self.config.slack_webhook.as_deref()) {
            None => log.skip(format!("the user has no {} address", rule.channel)),
            Some(a) => log.recipient = a,
        }
        if log.status == "pending" && !allowed(tx, user.id, event, &rule.channel)? {
            log.skip(format!("the user turned {} off for {event}", rule.channel));
        }
        Ok(Some(user))
    }

    /// Adds the event to the open digest of its (rule, recipient, key), or opens one whose
    /// message is sent when its window closes.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn collect(
        &self,
        tx: &mut dyn Tx,
        rule: &RuleRow,
        log: &LogRow,
        key: &str,
        window: i64,
        env: &EventEnvelope<Value>,
        now: i64,
        jobs: &mut Vec<NewJob>,
    ) -> Result<(), BackendError> {
        let line = format!("{}\n", json!({ "event_id": env.event_id, "payload": env.payload }));
        // Open a digest, or (when one is open: the unique index says so, and concurrent openers
        // wait for each other) add to it.
        let id = uuid::Uuid::now_v7().to_string();
        let opened = tx.query(
            "INSERT INTO notify_digests (id, rule_id, recipient, user_id, digest_key, status, events, count, first_event, opened_at, closes_at)
             VALUES ($1, $2, $3, $4, $5, 'open', $6, 1, $7, $8, $9)
             ON CONFLICT (rule_id, recipient, digest_key) WHERE status = 'open' DO NOTHING
             RETURNING id",
            &[
                id.clone().into(),
                rule.id.into(),
                log.recipient.clone().into(),
                log.user_id.into(),
                key.into(),
                line.clone().into(),
                env.event_id.clone().into(),
                now.into(),
                (now + window).into(),
            ],
        )?;
        if opened.is_empty() {
            tx.execute(
                "UPDATE notify_digests SET events = events || $4, count = count + 1
                 WHERE rule_id = $1 AND recipient = $2 AND digest_key = $3 AND status = 'open'",
                &[rule.id.into(), log.recipient.clone().into(), key.into(), line.into()],
            )?;
            return Ok(());
        }
        jobs.push(NewJob::new(DIGEST_KIND, &DigestRef { digest_id: id }).queue(QUEUE).run_at(now + window).max_attempts(10));
        Ok(())
    }

    /// Sends a closed digest: one message over its events (`events`, `count`, `digest_key` in
    /// the template), through the same path as any notification.
    pub(super) fn close_digest(&self, tx: &mut dyn Tx, digest_id: &str, renders: &Prerendered) -> Result<(), BackendError> {
        let rows = tx.query(
            "UPDATE notify_digests SET status = 'sent' WHERE id = $1 AND status = 'open'
             RETURNING rule_id, user_id, digest_key, events, count, first_event",
            &[digest_id.into()],
        )?;
        let Some(d) = rows.first() else { return Ok(()) };
        let r = tx.query(DIGEST_RULE_SQL, &[d.int(0).into()])?;
        let Some(r) = r.first() else { return Ok(()) };
        let DigestParts { rule, event, first_event, last, mut context } = DigestParts::of(d, r);
        let rule_id = rule.id;
        let now = now_ms();
        let mut log = LogRow::new(&event, &first_event, rule_id, &rule.channel, now);
        let user = self.resolve(tx, &rule, &event, &last, &mut context, &mut log, renders)?;
        let mut jobs = Vec::new();
        let payload = json!({ "events": context["events"].clone() });
        self.finish(tx, &rule, user.as_ref(), &context, &payload, log, now, &mut jobs, renders)?;
        if !jobs.is_empty() {
            tx.enqueue(jobs)?;
        }
        Ok(())
    }

    /// Applies the rate limit, renders, writes the log row and (when it is to be sent) its
    /// delivery job — deferred by the rule's delay and the user's quiet hours.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish(
        &self,
        tx: &mut dyn Tx,
        rule: &RuleRow,
        user: Option<&UserRow>,
        context: &Value,
        payload: &Value,
        mut log: LogRow,
        now: i64,
        jobs: &mut Vec<NewJob>,
        renders: &Prerendered,
    ) -> Result<(), BackendError> {
        if log.status == "pending" {
            if let Some(u) = user {
                if !self.limiter.check_in(tx, &u.id.to_string())?.is_allowed() {
                    log.status = "rate_limited";
                    log.error =
                        Some(format!("over {} notifications per {:?}", self.config.rate_limit.limit, self.config.rate_limit.period));
                }
            }
        }
        if log.status == "pending" {
            let rendered = rule
                .subject
                .as_deref()
                .map(|s| renders.render(s, context, false))
                .transpose()
                .and_then(|s| Ok((s, renders.render(&rule.body, context, false)?)));
            match rendered {
                Ok((s, b)) => {
                    log.subject = s;
                    log.body = Some(b);
                }
                Err(e) => log.fail(format!("template: {e}")),
            }
        }
        if log.status == "pending" && self.dispatcher.providers(&rule.channel).is_empty() {
            log.fail(format!("no channel {:?} is configured", rule.channel));
        }
        if log.status == "pending" {
            let html = (rule.channel == "email").then(|| renders.render(&rule.body, context, true).unwrap_or_default());
            let d = Delivery {
                log_id: log.id.clone(),
                event: log.event.clone(),
                event_id: log.event_id.clone(),
                user_id: log.user_id,
                recipient: log.recipient.clone(),
                subject: log.subject.clone(),
                body: log.body.clone().unwrap_or_default(),
                html,
                payload: payload.clone(),
                signer: (rule.channel == "webhook").then(|| {
                    let owner = match (&rule.recipient, log.user_id) {
                        (None, Some(user)) => secrets::Owner::User(user),
                        _ => secrets::Owner::Rule(rule.id),
                    };
                    owner.key()
                }),
            };
            // Deferred, never dropped: after the rule's delay, and out of the user's quiet hours.
            let mut at = now + rule.delay_ms;
            if let Some(quiet_end) = user.and_then(|u| u.quiet_until(at)) {
                at = quiet_end;
            }
            let kind = Dispatcher::kind(&rule.channel);
            let mut job = NewJob::new(&kind, &d)
                .queue(&kind)
                .max_attempts(self.config.max_attempts)
                .backoff(Backoff::list(&self.config.backoff))
                .tag(format!("event:{}", log.event_id));
            if at > now {
                job = job.run_at(at);
            }
            jobs.push(job);
        }
        log.insert(tx)
    }
}
