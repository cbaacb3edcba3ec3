package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os/signal"
	"syscall"
	"time"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/retention"
)

// cmdPrune deletes published rows older than --older-than, in batches. It is
// safe to interrupt: each batch is its own transaction, and running it again
// continues where it stopped.
func cmdPrune(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("prune", flag.ContinueOnError)
	fs.SetOutput(stderr)
	olderThan := fs.Duration("older-than", 0, "delete rows published longer ago than this, e.g. 168h (required)")
	batchSize := fs.Int("batch-size", retention.DefaultBatchSize, "rows deleted per transaction")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: outbox-relay prune --older-than 168h [--batch-size 5000]")
		fmt.Fprintln(stderr, "\nDeletes published outbox rows older than the cut-off; unpublished rows are never deleted.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	switch {
	case fs.NArg() > 0:
		fmt.Fprintf(stderr, "outbox-relay prune: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return 2
	case *olderThan <= 0:
		fmt.Fprintln(stderr, "outbox-relay prune: --older-than is required and must be positive, e.g. --older-than 168h")
		return 2
	case *batchSize <= 0:
		fmt.Fprintf(stderr, "outbox-relay prune: --batch-size must be positive, got %d\n", *batchSize)
		return 2
	}
	cfg, ok := loadConfig(stderr, true)
	if !ok {
		return 2
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	pool, err := newPool(ctx, cfg, 1)
	if err != nil {
		fmt.Fprintf(stderr, "outbox-relay prune: %v\n", err)
		return 2
	}
	defer pool.Close()
	schema, table, _ := config.SplitTable(cfg.Table)
	tbl := retention.Table{Schema: schema, Name: table}

	fmt.Fprintf(stdout, "pruning rows of %s published more than %s ago, %d per batch\n", tbl, *olderThan, *batchSize)
	began, last := time.Now(), time.Now()
	n, err := retention.Prune(ctx, pool, tbl, *olderThan, *batchSize, func(deleted int64) {
		if time.Since(last) >= time.Second {
			last = time.Now()
			fmt.Fprintf(stdout, "deleted %d rows…\n", deleted)
		}
	})
	took := time.Since(began).Round(time.Millisecond)
	switch {
	case errors.Is(err, context.Canceled):
		fmt.Fprintf(stdout, "interrupted after deleting at least %d rows in %s; the table is consistent, run prune again to continue\n", n, took)
		return 1
	case err != nil:
		fmt.Fprintf(stderr, "outbox-relay prune: %s: %v (deleted %d rows before the error)\n", config.Redact(cfg.DatabaseURL), err, n)
		return 1
	}
	fmt.Fprintf(stdout, "deleted %d rows in %s\n", n, took)
	return 0
}
