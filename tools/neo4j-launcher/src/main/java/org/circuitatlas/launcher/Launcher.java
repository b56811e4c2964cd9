package org.circuitatlas.launcher;

import java.net.BindException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.time.Duration;
import java.util.concurrent.CountDownLatch;

import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.connectors.HttpConnector;
import org.neo4j.configuration.connectors.HttpsConnector;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.dbms.api.DatabaseManagementService;
import org.neo4j.dbms.api.DatabaseManagementServiceBuilder;
import org.neo4j.graphdb.GraphDatabaseService;
import org.neo4j.io.ByteUnit;

/**
 * Runs Neo4j Community (embedded) with only a Bolt connector on a loopback address.
 *
 * <p>Usage: {@code Launcher --home DIR --port N [--host 127.0.0.1] [--pagecache 1g]
 * [--config FILE] [--auth false]}, where FILE holds extra neo4j.conf settings (key=value lines). The data lives under DIR/data and persists across restarts; the JVM
 * heap is set by the caller with -Xmx. SIGTERM (or Ctrl-C) runs a shutdown hook that shuts the
 * database down cleanly. Authentication is off unless {@code --auth true} (then the initial
 * user is neo4j/neo4j and must change its password): without auth, only bind to loopback.
 *
 * <p>Exit codes: 0 clean shutdown, 2 bad arguments, 3 store locked by another process, 4 port
 * already in use, 1 anything else. The first line on stderr of a failed start names the reason.
 */
public final class Launcher {
    static final int EXIT_USAGE = 2;
    static final int EXIT_LOCKED = 3;
    static final int EXIT_PORT = 4;

    private Launcher() {}

    public static void main(String[] args) {
        Path home = null;
        String host = "127.0.0.1";
        int port = -1;
        String pagecache = "512m";
        Path config = null;
        boolean auth = false;
        for (int i = 0; i < args.length; i++) {
            String arg = args[i];
            String value = i + 1 < args.length ? args[i + 1] : null;
            if (value == null) {
                usage("missing value after " + arg);
            }
            switch (arg) {
                case "--home" -> home = Paths.get(value).toAbsolutePath();
                case "--host" -> host = value;
                case "--port" -> port = Integer.parseInt(value);
                case "--pagecache" -> pagecache = value;
                case "--config" -> config = Paths.get(value).toAbsolutePath();
                case "--auth" -> auth = Boolean.parseBoolean(value);
                default -> usage("unknown argument " + arg);
            }
            i++;
        }
        if (home == null || port <= 0) {
            usage("--home and --port are required");
        }

        DatabaseManagementService service;
        try {
            Files.createDirectories(home);
            DatabaseManagementServiceBuilder builder = new DatabaseManagementServiceBuilder(home);
            if (config != null) {
                builder.loadPropertiesFromFile(config);
            }
            service = builder
                    .setConfig(BoltConnector.enabled, true)
                    .setConfig(BoltConnector.listen_address, new SocketAddress(host, port))
                    .setConfig(BoltConnector.advertised_address, new SocketAddress(host, port))
                    .setConfig(HttpConnector.enabled, false)
                    .setConfig(HttpsConnector.enabled, false)
                    .setConfig(GraphDatabaseSettings.pagecache_memory, ByteUnit.parse(pagecache))
                    .setConfig(GraphDatabaseSettings.auth_enabled, auth)
                    .setConfig(GraphDatabaseSettings.shutdown_transaction_end_timeout, Duration.ofSeconds(5))
                    .build();
            // Opening the default database makes a lock or store problem surface here, not later.
            GraphDatabaseService db = service.database(GraphDatabaseSettings.DEFAULT_DATABASE_NAME);
            if (!db.isAvailable(60_000)) {
                throw new IllegalStateException("database did not become available within 60 s");
            }
        } catch (Throwable exc) {
            fail(exc, home, port);
            return;
        }

        CountDownLatch stopped = new CountDownLatch(1);
        final DatabaseManagementService running = service;
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            System.out.println("circuit-atlas-neo4j: shutting down");
            try {
                running.shutdown();
            } finally {
                System.out.println("circuit-atlas-neo4j: stopped");
                System.out.flush();
                stopped.countDown();
            }
        }, "circuit-atlas-shutdown"));
        System.out.println("circuit-atlas-neo4j: ready bolt://" + host + ":" + port + " home=" + home);
        System.out.flush();
        try {
            stopped.await();
        } catch (InterruptedException exc) {
            Thread.currentThread().interrupt();
        }
    }

    private static void usage(String message) {
        System.err.println("circuit-atlas-neo4j: " + message);
        System.err.println("usage: Launcher --home DIR --port N [--host H] [--pagecache 1g] [--config FILE] [--auth false]");
        System.exit(EXIT_USAGE);
    }

    private static void fail(Throwable exc, Path home, int port) {
        int code = 1;
        String reason = exc.getClass().getSimpleName() + ": " + exc.getMessage();
        for (Throwable t = exc; t != null; t = t.getCause()) {
            String name = t.getClass().getName();
            String msg = String.valueOf(t.getMessage());
            if (name.endsWith("FileLockException") || msg.contains("Lock file has been locked")
                    || msg.contains("unable to obtain lock") || msg.contains("Unable to obtain lock")) {
                code = EXIT_LOCKED;
                reason = "store locked: the database under " + home + " is in use by another process";
                break;
            }
            if (t instanceof BindException || msg.contains("Address already in use")
                    || name.endsWith("PortBindException")) {
                code = EXIT_PORT;
                reason = "port in use: 127.0.0.1:" + port + " is already taken";
                break;
            }
        }
        System.err.println("circuit-atlas-neo4j: " + reason);
        exc.printStackTrace(System.err);
        System.err.flush();
        // halt: do not run shutdown hooks of a half-started database
        Runtime.getRuntime().halt(code);
    }
}
